"""scripts/gpu_bundle.py: the wheels it carries cover what the GPU leg imports beyond the GPU
image's packages (a missing one, fastapi-offline, would have stopped the serving check at its
first import on a lent machine, where nothing installs from a registry)."""

from __future__ import annotations

import importlib.util
from importlib import metadata
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
#: What the GPU leg imports beyond the project's own dependencies (training: the validation's
#: edit distance and the renderer's fonts; wordfreq travels as a shim, lmdb and matplotlib stay here).
TRAINING_ROOTS = ("rapidfuzz", "fonttools")


@pytest.fixture(scope="module")
def bundle() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_bundle", REPO / "scripts" / "gpu_bundle.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _requirements(dist: str) -> list[str]:
    """The distributions ``dist`` needs, its extras left out, its markers read for Python 3.12 on Linux (the image's)."""
    env = {"extra": "", "python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux"}
    needs = []
    for text in metadata.requires(dist) or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate(env):
            needs.append(req.name)
    return needs


def test_the_wheels_cover_what_the_image_lacks(bundle: ModuleType) -> None:
    _normal = bundle._normal
    image = {_normal(line) for line in bundle.IMAGE_PACKAGES.read_text().splitlines() if line and not line.startswith("#")}
    wheels = {_normal(w.split("==")[0]) for w in bundle.GPU_WHEELS}
    assert len(image) > 150 and "torch" in image and "fastapi" not in image
    missing, seen = set(), set()
    todo = [*_requirements("safl"), *TRAINING_ROOTS]
    while todo:
        name = _normal(todo.pop())
        if name in seen or name in image and name not in wheels:
            continue  # the image's own package brings what it needs
        seen.add(name)
        if name not in wheels:
            missing.add(name)
        try:
            todo += _requirements(name)
        except metadata.PackageNotFoundError:
            missing.add(f"{name} (not installed here either)")
    assert not missing, f"add to GPU_WHEELS: {sorted(missing)}"
    # and nothing carried that nothing needs
    assert wheels <= seen, f"not needed: {sorted(wheels - seen)}"


def test_a_spaced_charset_travels_as_a_file_with_its_trailing_space(bundle: ModuleType, tmp_path: Path) -> None:
    from model.charset import DEFAULT_CHARS
    from model.training.train import read_charset

    out = tmp_path / "charset.txt"
    assert bundle.pack_charset(DEFAULT_CHARS + " ", out) == DEFAULT_CHARS + " "
    assert read_charset(str(out)) == DEFAULT_CHARS + " "  # what gpu_train.sh passes to --charset
    assert bundle.pack_charset(None, out) is None and not out.exists()  # a stale one goes


def test_fonts_are_subset_to_the_charset_and_the_space(bundle: ModuleType) -> None:
    from model.charset import DEFAULT_CHARS

    assert bundle.subset_text(None) == bundle.subset_text(DEFAULT_CHARS + " ") == DEFAULT_CHARS + " "
    assert bundle.subset_text("abcé") == "abcé "


def test_the_shipped_init_travels_with_the_tree(bundle: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "init").mkdir()
    (tmp_path / "init" / "init.safetensors").write_bytes(b"stale")
    assert bundle.pack_init(REPO / "weights" / "safl.safetensors", tmp_path / "init") == "weights/safl.safetensors"
    assert not (tmp_path / "init").exists()
