"""Which torch device a ``--device`` / ``SAFL_DEVICE`` value names: one resolver for
serving, evaluation and training."""

from __future__ import annotations

import torch


class DeviceUnavailable(ValueError):
    """The device asked for does not exist on this machine."""


def resolve_device(name: str) -> torch.device:
    """``auto`` → ``cuda`` when available, else ``cpu``; ``cpu``, ``cuda`` and ``cuda:N`` as
    named. Raises ``DeviceUnavailable`` for a CUDA device this machine lacks (CUDA missing
    from the torch build or no such index)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"device {name!r} requested but no CUDA GPU is visible to this torch build ({torch.__version__}); use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceUnavailable(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device
