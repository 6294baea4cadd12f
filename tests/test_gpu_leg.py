"""The GPU leg end to end on this CPU (its dry run): ``scripts/gpu_train.sh`` on a small bundle
trains from the bundle's init over its charset with crops rendered in the bundle's fonts, leaves
what a device call brings back under ``$OUT``, and ``scripts/gpu_unpack.sh`` turns that into a
run that ``safl train --resume`` continues here. A lent GPU gives a task minutes, once: a flag
renamed in ``safl train`` or a path the script gets wrong must fail here, not there."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import render_word

from model.charset import DEFAULT_CHARS
from model.checkpoint import read_info

REPO = Path(__file__).resolve().parent.parent


def _bundle(root: Path, init: Path) -> Path:
    """What ``scripts/gpu_bundle.py`` packs, small: the init named with its sha256, a spaced
    charset, two DejaVu faces (a training family that draws the space), three real folders."""
    fonts = sorted(p for p in Path("/usr/share/fonts").rglob("DejaVuSans*.ttf") if "Mono" not in p.name)[:2]
    if not fonts:
        pytest.skip("no DejaVu fonts installed (fonts-dejavu-core)")
    bundle = root / "bundle"
    (bundle / "fonts").mkdir(parents=True)
    for f in fonts:
        shutil.copy(f, bundle / "fonts" / f.name)
    (bundle / "charset.txt").write_text(DEFAULT_CHARS + " ", encoding="utf-8")
    words = ["cab", "fig", "dog", "egg", "bead", "face", "jam", "kale", "lamp", "mop"]
    for name in ("iiit5k", "svt", "ic15"):
        folder = bundle / "real" / name
        folder.mkdir(parents=True)
        for i, w in enumerate(words):
            render_word(w).save(folder / f"{i}.png")
        (folder / "labels.tsv").write_text("".join(f"{i}.png\t{w}\n" for i, w in enumerate(words)))
    manifest = {"init": str(init), "init_sha256": hashlib.sha256(init.read_bytes()).hexdigest(), "fonts": len(fonts), "fonts_with_space": len(fonts)}
    (bundle / "MANIFEST.json").write_text(json.dumps(manifest))
    return bundle


def _run(cmd: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_gpu_leg_trains_returns_its_state_and_resumes_here(tmp_path: Path, tiny_checkpoint: Path) -> None:
    bundle = _bundle(tmp_path, tiny_checkpoint)
    out, run = tmp_path / "out", tmp_path / "run"
    env = {
        **os.environ,
        **dict(BUNDLE=str(bundle), DEVICE="cpu", ASSETS="0", CHECK="0", WORKERS="1", BATCH="8", TOTAL="2", MINUTES="1"),
        **dict(PYTHON=sys.executable, RUN=str(run), OUT=str(out)),
    }
    leg = _run(["bash", "scripts/gpu_train.sh"], env)
    assert leg.returncode == 0, leg.stdout[-3000:] + leg.stderr[-3000:]
    assert "training: exit 0" in leg.stdout
    # What a device call brings back, and no more files than it may (8).
    back = sorted(p.name for p in out.iterdir())
    assert back == ["last.safetensors", "run.tar", "state.pt.part-00", "train.log"], back
    with tarfile.open(out / "run.tar") as tar:
        assert {"./config.json", "./log.jsonl", "./best.safetensors"} <= set(tar.getnames())
    trained = json.loads((run / "last.json").read_text())
    assert trained["config"]["charset"] == DEFAULT_CHARS + " "  # the bundle's charset, not the init's
    assert trained["training"]["step"] == 2
    assert trained["training"]["data"]["synthetic"][0]["stream"] is True
    assert trained["training"]["distill"]["teacher"] == read_info(tiny_checkpoint).model_id  # held to the init
    log = (out / "train.log").read_text()
    assert "streamed synthetic" in log, log[-2000:]
    assert "no system fonts found" not in leg.stdout + leg.stderr  # the bundle's faces were found (SAFL_FONT_DIRS)

    here = tmp_path / "here"
    unpack = _run(["bash", "scripts/gpu_unpack.sh", str(out), str(here)], env)
    assert unpack.returncode == 0, unpack.stderr
    resumed = _run(
        [
            sys.executable,
            "-m",
            "model.training.cli",
            "train",
            "--out",
            str(here),
            "--resume",
            "--override-saved",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--stream-workers",
            "1",
            "--total-steps",
            "3",
            "--no-progress",
        ],
        env,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed at step 2" in resumed.stdout + resumed.stderr
    assert json.loads((here / "last.json").read_text())["training"]["step"] == 3


def test_a_bundle_built_for_other_weights_is_refused_before_anything_runs(tmp_path: Path, tiny_checkpoint: Path) -> None:
    bundle = _bundle(tmp_path, tiny_checkpoint)
    manifest = json.loads((bundle / "MANIFEST.json").read_text())
    (bundle / "MANIFEST.json").write_text(json.dumps({**manifest, "init_sha256": "0" * 64}))
    env = {
        **os.environ,
        **dict(BUNDLE=str(bundle), DEVICE="cpu", ASSETS="0", CHECK="0", PYTHON=sys.executable, RUN=str(tmp_path / "run"), OUT=str(tmp_path / "out")),
    }
    leg = _run(["bash", "scripts/gpu_train.sh"], env)
    assert leg.returncode == 2 and "not the init the bundle was built for" in leg.stderr
    assert not (tmp_path / "run").exists()
