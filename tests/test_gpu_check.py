"""bench/gpu_check.sh without CUDA: one clear line and exit status 2, at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def _check(out: Path, python: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": python}
    return subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(out)], capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run the whole check")
def test_gpu_check_stops_at_once_without_cuda(tmp_path: Path) -> None:
    run = _check(tmp_path / "out", sys.executable)
    assert run.returncode == 2
    assert run.stdout == "" and len(run.stderr.splitlines()) == 1 and "no CUDA device" in run.stderr
    assert not (tmp_path / "out").exists()


def test_gpu_check_names_an_interpreter_without_torch(tmp_path: Path) -> None:
    # A lent machine's python3 without the bundle's path, say: the reason, not "no CUDA device".
    fake = tmp_path / "python-without-torch"
    fake.write_text("#!/bin/sh\necho 'Traceback (most recent call last):' >&2\necho \"ModuleNotFoundError: No module named 'torch'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    run = _check(tmp_path / "out", str(fake))
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip() == f"gpu_check: {fake} cannot import torch: ModuleNotFoundError: No module named 'torch'"
