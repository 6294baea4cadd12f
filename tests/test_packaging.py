"""A non-editable install (a wheel) carries the shipped weights and finds them.

Built with pip from this checkout and unpacked into a folder that comes first on
``sys.path``, in a process started outside the checkout, so nothing can fall back on the
repository's ``weights/``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_wheel_install_serves_the_shipped_weights(tmp_path: Path) -> None:
    wheels, target, src = tmp_path / "wheels", tmp_path / "site", tmp_path / "src"
    # Built from a copy: setuptools leaves build/ and *.egg-info in the tree it builds.
    for name in ("model", "service", "weights"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", src)
    build = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels)]
    subprocess.run(build, check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("safl-*.whl")
    # Nothing outside the product: no tests, benchmarks, scripts, docs or training log.
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops - {"model", "service", "safl_weights"} == {next(t for t in tops if t.endswith(".dist-info"))}, sorted(tops)
    weights = sorted(name.split("/", 1)[1] for name in names if name.startswith("safl_weights/"))
    assert weights == ["MODEL_CARD.md", "safl.json", "safl.safetensors"], weights
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], check=True, capture_output=True, timeout=300
    )
    probe = (
        "import json, model, service; from model.checkpoint import read_info; from service import Settings; "
        "from service.page import ASSETS, _read; w = Settings().weights; info = read_info(w); "
        "page = {n: len(_read(n)) for n in ['index.html', *ASSETS]}; "
        "print(json.dumps({'model': model.__file__, 'weights': str(w), 'name': info.name, 'sha': info.sha256, 'page': page}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": ""}, check=True, capture_output=True, text=True, timeout=120
    )
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["model"].startswith(str(target)), found  # the installed copy, not this checkout
    assert found["weights"].startswith(str(target)) and found["weights"].endswith("safl.safetensors"), found
    shipped = json.loads((ROOT / "weights" / "safl.json").read_text())
    assert found["sha"] == shipped["sha256"]
    # The web page's files travel as package data (service/static), read by importlib.resources.
    assert found["page"] and all(found["page"].values()), found["page"]
