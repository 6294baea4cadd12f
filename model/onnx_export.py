"""The network as two ONNX graphs: the encoder (rectify → encode → the decoder's
cross-attention keys/values) and one decoder step with its key/value cache.

Greedy decoding is a loop of decoder steps, so the loop stays outside the graphs: a
runtime calls ``encoder`` once per batch and ``decoder_step`` once per character
(``model.onnx_reader`` does it with ONNX Runtime; the layout is in ``OnnxLayout``).
Exported with the TorchScript exporter at opset 17 (``torch.onnx.export(dynamo=False)``).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .onnx_layout import ENCODER_FILE, LAYOUT_FILE, STEP_FILE, OnnxLayout, write_graphs
from .safl import SAFL

__all__ = ["ENCODER_FILE", "LAYOUT_FILE", "OPSET", "STEP_FILE", "OnnxLayout", "export_graphs", "export_onnx"]

OPSET = 17


class EncoderGraph(nn.Module):
    """Images → the cross-attention keys and values of every decoder layer."""

    def __init__(self, model: SAFL) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        memory = self.model.encode(images)
        return tuple(t for kv in self.model.decoder.memory_kv(memory) for t in kv)


class DecoderStepGraph(nn.Module):
    """One position of ``TransformerDecoder.step``, with the caches as tensors in and out."""

    def __init__(self, model: SAFL) -> None:
        super().__init__()
        self.decoder = model.decoder

    def forward(self, token: torch.Tensor, position: torch.Tensor, *kv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = len(self.decoder.layers)
        caches, memory = kv[: 2 * n], kv[2 * n :]
        pairs = lambda flat: [(flat[2 * i], flat[2 * i + 1]) for i in range(n)]  # noqa: E731
        logits, new = self.decoder.step(token, position, pairs(memory), pairs(caches))
        return (logits[:, -1], *(t for kv_pair in new for t in kv_pair))


def export_graphs(model: SAFL, model_id: str) -> tuple[bytes, bytes, OnnxLayout]:
    """The encoder and decoder-step graphs as ONNX bytes, and their layout. The model is
    exported in eval mode (BatchNorm statistics, no dropout) and left in the mode it was in."""
    layout = OnnxLayout.of(model, model_id)
    cfg = model.config
    was_training = model.training
    model.eval()
    try:
        images = torch.zeros(2, cfg.channels, cfg.height, cfg.width)
        enc = EncoderGraph(model).eval()
        with torch.no_grad():
            memory = enc(images)
        batch = {0: "batch"}
        enc_bytes = _export(enc, (images,), ["images"], layout.memory_names, {"images": batch, **dict.fromkeys(layout.memory_names, batch)})
        # A non-empty cache at export, so no size is specialised to 0 (the first step has t = 0).
        caches = [torch.zeros(2, layout.heads, 3, layout.head_dim) for _ in layout.cache_names]
        token, position = torch.zeros(2, 1, dtype=torch.long), torch.tensor([3])
        dynamic = {"token": batch, "logits": batch}
        dynamic |= dict.fromkeys(layout.memory_names, batch)
        dynamic |= dict.fromkeys(layout.cache_names, {0: "batch", 2: "past"})
        dynamic |= dict.fromkeys(layout.new_cache_names, {0: "batch", 2: "past_and_this"})
        step = DecoderStepGraph(model).eval()
        step_bytes = _export(
            step,
            (token, position, *caches, *memory),
            ["token", "position", *layout.cache_names, *layout.memory_names],
            ["logits", *layout.new_cache_names],
            dynamic,
        )
    finally:
        model.train(was_training)
    return enc_bytes, step_bytes, layout


def _export(module: nn.Module, args: tuple, inputs: list[str], outputs: list[str], dynamic: dict) -> bytes:
    buf = io.BytesIO()
    # The TorchScript exporter warns that it is deprecated and that traced constants are
    # constants (they are: shapes and fixed tensors); on every service start that is noise.
    # torch is pinned exactly, and the export is checked against PyTorch by tests/test_onnx.py.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(module, args, buf, input_names=inputs, output_names=outputs, dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)
    return buf.getvalue()


def export_onnx(model: SAFL, model_id: str, out: str | os.PathLike[str]) -> list[Path]:
    """Write ``encoder.onnx``, ``decoder_step.onnx`` and ``safl-onnx.json`` (the
    ``OnnxLayout`` and the model's config) into the folder ``out`` (created); returns the paths."""
    return write_graphs(out, *export_graphs(model, model_id))
