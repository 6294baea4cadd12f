"""What ``safl recognize`` reads with: the ONNX graphs an earlier start cached for this
checkpoint, read without PyTorch (about a second less to start), or the loaded predictor.

Both answer the same: the cached graphs are the ones the predictor's ONNX backend reads
(``model.onnx_cache``), fed the same float32 pixels (``model.preprocess.to_array`` is
``to_tensor`` bit for bit). The cached path is taken only where the predictor would read
on ONNX Runtime on the CPU with plain greedy decoding; anything else loads the predictor.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from model.calibration import Calibration, read_calibration
from model.checkpoint import file_sha256
from model.device import cpu_for_certain
from model.preprocess import PreprocessConfig, to_array, to_tensor
from model.reading import Recognition

if TYPE_CHECKING:
    import numpy as np

    from model.search import DecodeOptions

    from .predictor import Predictor


@dataclass(frozen=True)
class LocalReader:
    """A model ready to read crops' views."""

    model_id: str
    preprocess_config: PreprocessConfig
    #: One batch of views (uint8 pixels, ``model.preprocess.views``) → one reading per view.
    read_batch: Callable[[list[np.ndarray]], list[Recognition]]
    #: ``"onnx-cached"`` (no PyTorch loaded) or the predictor's backend.
    engine: str
    #: The checkpoint's calibration of ``confidence`` (``model.calibration``); ``None``: none.
    calibration: Calibration | None = None


def cached_onnx_reader(
    weights: str | os.PathLike[str], device: str, backend: str, threads: int | None, cache_dir: str | os.PathLike[str] | None
) -> LocalReader | None:
    """The reader of the graphs cached for ``weights`` (a ``.safetensors`` file with its
    ``.json`` sidecar), when ``device`` is the CPU for certain and ``backend`` picks ONNX Runtime
    there (``model.engine.choose_engine``); ``None`` when any of that does not hold or nothing
    usable is cached."""
    from model.engine import EngineUnavailable, choose_engine
    from model.onnx_cache import cache_entry, load

    path = Path(weights)
    try:
        # The CPU for certain, as choose_engine is then told; where only PyTorch can tell, the predictor asks.
        if not cpu_for_certain(device) or choose_engine(backend, "cpu") != "onnx" or path.suffix != ".safetensors":
            return None
    except EngineUnavailable:  # an unknown name: the predictor says so
        return None
    try:
        graphs = load(cache_entry(cache_dir, file_sha256(path), path.with_suffix(".json").read_bytes()))
        if graphs is None:
            return None
        from model.onnx_reader import OnnxReader

        reader = OnnxReader(*graphs, threads)
        calibration = read_calibration(path)
    except Exception:  # no onnxruntime, unreadable files, graphs ONNX Runtime refuses: the predictor then says what is wrong
        return None
    return LocalReader(reader.layout.model_id, reader.preprocess_config, lambda views: reader.read(to_array(views)), "onnx-cached", calibration)


def predictor_reader(predictor: Predictor, decode: DecodeOptions) -> LocalReader:
    """The loaded ``predictor``, each view decoded as ``decode`` says."""
    from model.search import PLAIN

    from .predictor import ModelInput

    def read_batch(views: list[np.ndarray]) -> list[Recognition]:
        tensors = [to_tensor(v) for v in views]
        return predictor.recognize(tensors if decode is PLAIN else [ModelInput(t, decode) for t in tensors])

    predictor.init_thread()
    return LocalReader(predictor.info.model_id, predictor.preprocess_config, read_batch, predictor.backend, predictor.calibration)
