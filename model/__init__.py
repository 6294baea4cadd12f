"""SAFL scene-text recognition model: network, pre-processing, charset, loss, checkpoints.

This package never imports ``service``: training and serving both build on it.
"""

from .charset import Charset
from .checkpoint import CheckpointError, CheckpointInfo, load_checkpoint, save_checkpoint
from .preprocess import PreprocessConfig
from .reading import Recognition
from .safl import PRESETS, SAFL, SAFLConfig

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
