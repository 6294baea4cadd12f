"""SAFL scene-text recognition model: network, pre-processing, charset, loss, checkpoints.

This package never imports ``service``: training and serving both build on it. Its names are
imported on first use (PEP 562), so a tool that needs only the charset, the pre-processing or
the ONNX reader (``safl recognize`` with cached graphs) does not pay for importing PyTorch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .charset import Charset
    from .checkpoint import CheckpointError, CheckpointInfo, load_checkpoint, save_checkpoint
    from .preprocess import PreprocessConfig
    from .reading import Recognition
    from .safl import PRESETS, SAFL, SAFLConfig

#: Public name -> the submodule that defines it.
_HOMES = {
    "Charset": "charset",
    "CheckpointError": "checkpoint",
    "CheckpointInfo": "checkpoint",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "PreprocessConfig": "preprocess",
    "Recognition": "reading",
    "PRESETS": "safl",
    "SAFL": "safl",
    "SAFLConfig": "safl",
}

__all__ = [
    "PRESETS",
    "SAFL",
    "CheckpointError",
    "CheckpointInfo",
    "Charset",
    "PreprocessConfig",
    "Recognition",
    "SAFLConfig",
    "load_checkpoint",
    "save_checkpoint",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{home}", __name__), name)
