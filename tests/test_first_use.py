"""First use, as a newcomer meets it: ``safl recognize`` reading graphs exported once and
kept (without importing PyTorch), ``safl serve`` on a taken port or with bad settings, and
the module form run from a folder with a ``model.py`` of its own. Real subprocesses, the
real tiny model, no timing: the start-up time is measured by ``bench/startup.py``."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import render_word
from service_support import REPO, subprocess_env

from model import load_checkpoint
from model.onnx_cache import cache_entry, cache_key, load
from service import predictor as predictor_module
from service.predictor import Predictor

#: Runs `safl recognize` in-process and says on standard error whether PyTorch was imported.
_RECOGNIZE = "import sys; from service.cli import main; rc = main(sys.argv[1:]); print('torch' in sys.modules, file=sys.stderr); raise SystemExit(rc)"


def _recognize(args: list[str], cache: Path) -> subprocess.CompletedProcess[str]:
    env = subprocess_env() | {"SAFL_CACHE_DIR": str(cache)}
    return subprocess.run([sys.executable, "-c", _RECOGNIZE, "recognize", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)


def test_the_graphs_are_exported_once_per_checkpoint(
    tiny_checkpoint: Path, memorised_checkpoint: tuple[Path, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exports = []
    real = predictor_module.export_graphs_checked
    monkeypatch.setattr(predictor_module, "export_graphs_checked", lambda *a: exports.append(a[1]) or real(*a))
    for _ in range(2):
        assert Predictor.load(tiny_checkpoint, "cpu", threads=1, cache_dir=tmp_path).backend == "onnx"
    assert len(exports) == 1  # the second start read the graphs kept by the first
    Predictor.load(memorised_checkpoint[0], "cpu", threads=1, cache_dir=tmp_path)
    assert len(exports) == 2  # another checkpoint: its own entry
    _, info = load_checkpoint(tiny_checkpoint)
    folder = cache_entry(tmp_path, info.sha256, tiny_checkpoint.with_suffix(".json").read_bytes())
    assert folder.name.startswith(info.sha256[:12]) and load(folder) is not None
    # The key changes with the sidecar (a renamed model), so a stale model id is never served.
    assert cache_key(info.sha256, b"{}") != folder.name


def test_an_unwritable_cache_still_serves(tiny_checkpoint: Path, tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    assert Predictor.load(tiny_checkpoint, "cpu", threads=1, cache_dir=blocked).backend == "onnx"


@pytest.mark.slow
def test_recognize_reads_the_cached_graphs_without_pytorch_and_answers_the_same(tiny_checkpoint: Path, tmp_path: Path) -> None:
    crops = []
    for i, (word, size) in enumerate([("hello", (128, 32)), ("EXIT", (90, 40)), ("tall", (30, 90))]):
        crops.append(tmp_path / f"{i}.png")
        render_word(word, size).save(crops[-1])
    args = [*map(str, crops), "--weights", str(tiny_checkpoint), "--threads", "1", "--format", "jsonl"]
    cache = tmp_path / "cache"
    first = _recognize(args, cache)  # nothing cached: the predictor loads, exports and keeps the graphs
    second = _recognize(args, cache)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stderr.strip() == "True" and second.stderr.strip() == "False"  # PyTorch imported only the first time
    assert second.stdout == first.stdout  # the same readings, to the last digit
    assert [json.loads(line)["file"] for line in second.stdout.splitlines()] == [str(c) for c in crops]
    # What the cached path cannot do (a lexicon, top_k) still loads the predictor.
    words = tmp_path / "words.txt"
    words.write_text("hello\nEXIT\n")
    third = _recognize([*args, "--lexicon", str(words)], cache)
    assert third.returncode == 0 and third.stderr.strip() == "True"


def test_serve_on_a_taken_port_says_so_before_loading_the_model(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # Weights that do not exist: the port is checked first, so that is not what it reports.
        cmd = [sys.executable, "-m", "service", "serve", "--port", str(port), "--weights", str(tmp_path / "none.safetensors")]
        out = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and f"port {port} on 127.0.0.1 is already in use" in out.stderr and "--port" in out.stderr, out.stderr


def test_invalid_settings_are_one_line_each_naming_the_flag_and_the_variable(tiny_checkpoint: Path) -> None:
    env = subprocess_env() | {"SAFL_PORT": "eighty", "SAFL_MAX_FILES": "0"}
    cmd = [sys.executable, "-m", "service", "serve", "--weights", str(tiny_checkpoint), "--log-level", "warning"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.splitlines()
    assert len(lines) == 2, out.stderr
    assert any(line.startswith("safl serve: invalid --port (SAFL_PORT): ") for line in lines), lines
    assert any(line.startswith("safl serve: invalid --max-files (SAFL_MAX_FILES): ") for line in lines), lines


def test_the_module_form_works_from_a_folder_with_its_own_model_py(tmp_path: Path) -> None:
    (tmp_path / "model.py").write_text("raise SystemExit('the folder own model.py was imported')\n")
    (tmp_path / "service.py").write_text("raise SystemExit('the folder own service.py was imported')\n")
    env = subprocess_env()
    env.pop("PYTHONPATH", None)  # as a user's shell has it: the installed packages only
    out = subprocess.run([sys.executable, "-P", "-m", "service", "--version"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("safl "), out.stderr
    fonts = subprocess.run(
        [sys.executable, "-P", "-m", "model.training.fonts", "--packages"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert fonts.returncode == 0 and "fonts-" in fonts.stdout, fonts.stderr


def _readme_first_request() -> tuple[list[str], dict]:
    """The files of the README's first ``curl`` (in "Use it") and the JSON answer it shows."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("\n## Use it") :]
    command = next(line for line in section.split("```bash", 1)[1].split("```", 1)[0].splitlines() if line.startswith("curl"))
    shown = json.loads(section.split("```json", 1)[1].split("```", 1)[0])
    return re.findall(r"files=@(\S+)", command), shown


def test_the_readmes_first_request_answers_as_shown(tmp_path: Path) -> None:
    """The README's first request, as pasted from the repository root, through the real app
    with the shipped weights and the default settings: its files exist and the answer is the
    one the README shows (texts exactly, confidences to the 2 decimals shown)."""
    import asyncio

    import httpx
    from service_support import running_app

    from model.checkpoint import shipped_weights
    from service import Settings

    paths, shown = _readme_first_request()
    assert paths and all((REPO / p).is_file() for p in paths), paths

    async def ask() -> dict:
        settings = Settings(weights=shipped_weights(), device="cpu", threads=1, cache_dir=tmp_path)  # graphs exported from this code
        async with running_app(settings) as (_, client):
            files = [("files", (Path(p).name, (REPO / p).read_bytes(), "image/png")) for p in paths]
            r: httpx.Response = await client.post("/recognize", files=files)
            assert r.status_code == 200, r.text
            return r.json()

    got = asyncio.run(ask())
    assert got["model"] == shown["model"]
    rounded = [
        {
            "filename": g["filename"],
            "text": g["text"],
            "confidence": round(g["confidence"], 2),
            "raw_confidence": round(g["raw_confidence"], 2),
            "char_confidences": [round(c, 2) for c in g["char_confidences"]],
        }
        for g in got["results"]
    ]
    assert rounded == shown["results"], json.dumps(rounded)
