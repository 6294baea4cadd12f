"""The network as two ONNX graphs: the encoder (rectify → encode → the decoder's
cross-attention keys/values) and one decoder step with its key/value cache.

Greedy decoding is a loop of decoder steps, so the loop stays outside the graphs: a
runtime calls ``encoder`` once per batch and ``decoder_step`` once per character
(``model.onnx_backend`` does it with ONNX Runtime; the layout is in ``OnnxLayout``).
Exported with the TorchScript exporter at opset 17 (``torch.onnx.export(dynamo=False)``).
"""

from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .safl import SAFL

OPSET = 17
#: File names ``export_onnx`` writes into its folder.
ENCODER_FILE, STEP_FILE, LAYOUT_FILE = "encoder.onnx", "decoder_step.onnx", "safl-onnx.json"


@dataclass(frozen=True)
class OnnxLayout:
    """Names and sizes a runtime needs to drive the two graphs.

    ``encoder``: input ``images`` float32 ``[B, C, H, W]`` (``model.preprocess.to_tensor``
    output) → ``memory_names``, float32 ``[B, heads, N, head_dim]`` each (per decoder layer
    its cross-attention keys, then values). ``decoder_step``: ``token`` int64 ``[B, 1]``
    (BOS first), ``position`` int64 ``[1]`` (0 for BOS), ``cache_names`` (per layer the
    self-attention keys and values of the positions so far, ``[B, heads, t, head_dim]``,
    ``t`` = 0 at the first step) and ``memory_names`` → ``logits`` float32 ``[B, vocab]``
    and ``new_cache_names`` (the caches with this position appended).
    """

    model_id: str
    config: dict
    layers: int
    heads: int
    head_dim: int
    vocab_size: int
    max_len: int
    memory_names: list[str]
    cache_names: list[str]
    new_cache_names: list[str]

    @classmethod
    def of(cls, model: SAFL, model_id: str) -> OnnxLayout:
        dec = model.decoder
        n, heads = len(dec.layers), dec.layers[0].self_attn.heads
        kv = [(i, part) for i in range(n) for part in ("k", "v")]
        return cls(
            model_id=model_id,
            config=model.config.to_dict(),
            layers=n,
            heads=heads,
            head_dim=model.config.d_model // heads,
            vocab_size=model.charset.vocab_size,
            max_len=dec.max_len,
            memory_names=[f"memory_{i}_{p}" for i, p in kv],
            cache_names=[f"cache_{i}_{p}" for i, p in kv],
            new_cache_names=[f"new_cache_{i}_{p}" for i, p in kv],
        )


class EncoderGraph(nn.Module):
    """Images → the cross-attention keys and values of every decoder layer."""

    def __init__(self, model: SAFL) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        memory = self.model.encode(images)
        return tuple(t for kv in self.model.decoder.memory_kv(memory) for t in kv)


class DecoderStepGraph(nn.Module):
    """One position of ``TransformerDecoder.run`` with a cache, with tensors in and out
    instead of a cache list updated in place."""

    def __init__(self, model: SAFL) -> None:
        super().__init__()
        self.decoder = model.decoder

    def forward(self, token: torch.Tensor, position: torch.Tensor, *kv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        d = self.decoder
        n = len(d.layers)
        caches, memory = kv[: 2 * n], kv[2 * n :]
        x = d.embed(token) + torch.index_select(d.pos, 0, position).unsqueeze(0)
        new: list[torch.Tensor] = []
        for i, layer in enumerate(d.layers):
            h = layer.norm1(x)
            k, v = layer.self_attn.project_kv(h)
            k, v = torch.cat([caches[2 * i], k], dim=2), torch.cat([caches[2 * i + 1], v], dim=2)
            new += [k, v]
            x = x + layer.self_attn.attend(h, k, v)
            x = x + layer.cross_attn.attend(layer.norm2(x), memory[2 * i], memory[2 * i + 1])
            x = x + layer.ffn(layer.norm3(x))
        return (d.head(d.norm(x))[:, -1], *new)


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
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    enc, step, layout = export_graphs(model, model_id)
    paths = [folder / ENCODER_FILE, folder / STEP_FILE, folder / LAYOUT_FILE]
    paths[0].write_bytes(enc)
    paths[1].write_bytes(step)
    paths[2].write_text(json.dumps(asdict(layout), indent=2) + "\n")
    return paths
