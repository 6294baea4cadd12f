"""The ONNX Runtime engine (``model.engine.Engine``): greedy crops read by ``model.onnx_reader``'s
NumPy loop over the two graphs of ``model.onnx_export`` (exported here, or given from
``model.onnx_cache``), the rest by the PyTorch model the graphs were exported from.

On these CPUs a decoder step costs PyTorch about 0.4 ms of per-operator overhead at batch
1 and ONNX Runtime a fraction of it (``bench/model_speed.py --backends``), which is most of
a word's reading time. Beam search (``top_k``), lexicons and the rectified image are
rarer requests and stay with PyTorch (``model.search.read_by_kind`` parts the two).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .onnx_cache import Graphs
from .onnx_reader import OnnxReader
from .reading import Recognition
from .safl import SAFL
from .search import DecodeOptions, per_crop, read_by_kind, token_masks

__all__ = ["OnnxEngine", "export_graphs_checked"]


def export_graphs_checked(model: SAFL, model_id: str) -> Graphs:
    """``model.onnx_export.export_graphs``; ``ImportError`` first without ``onnx``, which
    ``torch.onnx`` needs (reading cached graphs does not)."""
    import onnx  # noqa: F401 - torch.onnx.export needs it; fail here with an ImportError, not inside the export

    from .onnx_export import export_graphs

    return export_graphs(model, model_id)


class OnnxEngine:
    """``model`` (on the CPU) read through ONNX Runtime; the same readings as ``TorchEngine``.

    ``graphs``: the model's encoder and decoder-step graphs and their layout
    (``export_graphs_checked``, ``model.onnx_cache``); ``threads``: ONNX Runtime's threads for
    large batches (``OnnxReader``). Raises ``ImportError`` without ``onnxruntime``.
    """

    name = "onnx"

    def __init__(self, model: SAFL, graphs: Graphs, threads: int | None = None) -> None:
        self.reader = OnnxReader(*graphs, threads)
        self.layout = self.reader.layout
        self.model = model.eval()

    def recognize(
        self, images: torch.Tensor, amp_dtype: torch.dtype | None = None, options: DecodeOptions | Sequence[DecodeOptions] | None = None
    ) -> list[Recognition]:
        """``model.engine.Engine.recognize`` (``amp_dtype`` is ignored: float32 on the CPU)."""
        opts = per_crop(options, images.shape[0])
        vocab = self.model.charset.vocab_size

        def greedy(crops: list[int]) -> list[Recognition]:
            masks = token_masks([opts[i] for i in crops], vocab)
            rows = images if len(crops) == len(opts) else images[crops]
            return self.reader.read(rows.detach().cpu().numpy().astype(np.float32, copy=False), None if masks is None else masks.numpy())

        def searched(crops: list[int]) -> list[Recognition]:
            return self.model.recognize(images[crops], options=[opts[i] for i in crops])

        return read_by_kind(opts, greedy, searched)

    def rectify(self, images: torch.Tensor) -> torch.Tensor:
        """``SAFL.rectify``, by the PyTorch model."""
        return self.model.rectify(images)
