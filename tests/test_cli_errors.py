"""Ordinary mistakes with the `safl` command give one line and exit status 2, not a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import render_word

from service import cli


def _safl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service", *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_version() -> None:
    out = _safl("--version")
    assert out.returncode == 0 and out.stdout.startswith("safl ")


@pytest.mark.parametrize("command", ["synth", "train", "eval"])
def test_a_missing_training_extra_is_one_line(command: str, monkeypatch, capsys) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("fontTools", "rapidfuzz") else real(name, *a))
    args = {"synth": ["synth", "--count", "1"], "train": ["train"], "eval": ["eval", "--data", "x"]}[command]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"safl {command}: needs the training extra") and "pip install" in err


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ("file\ttext\n0.png\tword\n", "labels.tsv:1 names 'file', which is not in"),
        ("0.png,word\n", "expected 'file<TAB>text' (found a comma"),
        ("0.png word\n", "(found a space"),
        ("0.png\tword\nmissing.png\tword\n", "labels.tsv:2 names 'missing.png'"),
    ],
    ids=["header", "comma", "space", "missing_image"],
)
def test_eval_mistakes_in_a_folder_are_one_line(labels: str, message: str, tmp_path: Path, tiny_checkpoint: Path) -> None:
    render_word("word").save(tmp_path / "0.png")
    (tmp_path / "labels.tsv").write_text(labels)
    out = _safl("eval", "--weights", str(tiny_checkpoint), "--data", str(tmp_path), "--threads", "1")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().startswith("safl eval: ") and message in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_eval_of_missing_weights_is_one_line(tmp_path: Path) -> None:
    render_word("word").save(tmp_path / "0.png")
    (tmp_path / "labels.tsv").write_text("0.png\tword\n")
    out = _safl("eval", "--weights", str(tmp_path / "runs/mine/best.safetensors"), "--data", str(tmp_path))
    assert out.returncode != 0 and "Traceback" not in out.stderr and out.stderr.startswith("safl eval: ")
