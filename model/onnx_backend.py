"""``SAFL.recognize`` on ONNX Runtime: the two graphs of ``model.onnx_export`` (exported
here, or given from ``model.onnx_cache``) read by ``model.onnx_reader``'s greedy loop in NumPy.

On these CPUs a decoder step costs PyTorch about 0.4 ms of per-operator overhead at batch
1 and ONNX Runtime a fraction of it (``bench/model_speed.py --backends``), which is most of
a word's reading time. Beam search (``top_k``), lexicons and the rectified image are
rarer requests and stay with the PyTorch model this is built from.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .onnx_export import export_graphs
from .onnx_layout import OnnxLayout
from .onnx_reader import SMALL_BATCH, TELEMETRY_OFF, OnnxReader, keep_telemetry_off
from .preprocess import ViewConfig
from .reading import Recognition, read_images
from .safl import SAFL
from .search import PLAIN, DecodeOptions, token_masks

__all__ = ["SMALL_BATCH", "TELEMETRY_OFF", "OnnxRecognizer", "keep_telemetry_off"]


class OnnxRecognizer:
    """A loaded SAFL read through ONNX Runtime on the CPU; same readings as ``SAFL.recognize``.

    Raises ``ImportError`` if ``onnxruntime`` or ``onnx`` (which ``torch.onnx`` needs to
    export) is not installed.
    """

    def __init__(self, model: SAFL, model_id: str, threads: int | None = None, graphs: tuple[bytes, bytes, OnnxLayout] | None = None) -> None:
        if graphs is None:
            import onnx  # noqa: F401 - torch.onnx.export needs it; fail here with an ImportError, not inside the export

            graphs = export_graphs(model, model_id)
        self.reader = OnnxReader(*graphs, threads)
        self.layout = self.reader.layout
        self.model = model.eval()
        self.charset = model.charset

    def recognize(
        self, images: torch.Tensor, amp_dtype: torch.dtype | None = None, options: DecodeOptions | Sequence[DecodeOptions] | None = None
    ) -> list[Recognition]:
        """``SAFL.recognize`` (``amp_dtype`` is ignored: float32 on the CPU). Crops with a
        lexicon or ``top_k`` are read by the PyTorch model; the batch's other crops here."""
        b = images.shape[0]
        opts = [options or PLAIN] * b if options is None or isinstance(options, DecodeOptions) else list(options)
        if len(opts) != b:
            raise ValueError(f"{len(opts)} decode options for {b} images")
        greedy = [i for i, o in enumerate(opts) if o.greedy]
        out: list[Recognition | None] = [None] * b
        if len(greedy) < b:  # beam search and lexicons: the PyTorch decoder, for those crops only
            rest = [i for i, o in enumerate(opts) if not o.greedy]
            for i, r in zip(rest, self.model.recognize(images[rest], options=[opts[i] for i in rest]), strict=True):
                out[i] = r
        if greedy:
            masks = token_masks([opts[i] for i in greedy], self.charset.vocab_size)
            allowed = None if masks is None else masks.numpy()
            rows = images if len(greedy) == b else images[greedy]
            for i, r in zip(greedy, self.reader.read(rows.detach().cpu().numpy().astype(np.float32, copy=False), allowed), strict=True):
                out[i] = r
        return [r for r in out if r is not None]

    def recognize_images(self, images: list[Image.Image], view_cfg: ViewConfig = ViewConfig()) -> list[Recognition]:
        """``SAFL.recognize_images`` on ONNX Runtime."""
        return read_images(self.recognize, images, self.model.config.preprocess, view_cfg, torch.device("cpu"))

    def rectify(self, images: torch.Tensor) -> torch.Tensor:
        """``SAFL.rectify``, by the PyTorch model."""
        return self.model.rectify(images)
