"""Which torch device a ``--device`` / ``SAFL_DEVICE`` value names: one resolver for
serving, evaluation and training."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: Where a GPU driver shows itself on Linux: NVIDIA's kernel module, ROCm's, WSL2's GPU.
_GPU_DRIVER_PATHS = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


class DeviceUnavailable(ValueError):
    """The device asked for does not exist on this machine."""


def resolve_device(name: str) -> torch.device:
    """``auto`` → ``cuda`` when available, else ``cpu``; ``cpu``, ``cuda`` and ``cuda:N`` as
    named. Raises ``DeviceUnavailable`` for a CUDA device this machine lacks (CUDA missing
    from the torch build or no such index)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"device {name!r} requested but no CUDA GPU is visible to this torch build ({torch.__version__}); use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceUnavailable(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def cpu_for_certain(name: str) -> bool:
    """Whether ``resolve_device(name)`` is the CPU, told without importing PyTorch (about a
    second): ``cpu``, or ``auto`` on a Linux machine with no GPU driver loaded, where CUDA
    cannot be available. False when only PyTorch can tell."""
    if name == "cpu":
        return True
    return name == "auto" and sys.platform == "linux" and not any(os.path.exists(p) for p in _GPU_DRIVER_PATHS)
