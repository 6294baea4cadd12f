"""bench/gpu_check.sh without CUDA: one clear line and exit status 2, at once."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run the whole check")
def test_gpu_check_stops_at_once_without_cuda(tmp_path: Path) -> None:
    run = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stdout == "" and len(run.stderr.splitlines()) == 1 and "no CUDA device" in run.stderr
    assert not (tmp_path / "out").exists()
