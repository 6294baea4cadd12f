"""What a runtime needs to drive the two ONNX graphs of ``model.onnx_export``, and the
folder they are kept in (``safl export``, the graph cache): no PyTorch needed to read it."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .safl import SAFL

#: File names of a graph folder (``write_graphs``).
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

    @classmethod
    def from_dict(cls, data: dict) -> OnnxLayout:
        """Inverse of ``dataclasses.asdict``; raises ``ValueError`` for missing or unknown keys."""
        names = {f.name for f in fields(cls)}
        if set(data) != names:
            raise ValueError(f"not an ONNX layout: keys {sorted(set(data) ^ names)} differ")
        return cls(**data)


def write_graphs(folder: str | os.PathLike[str], encoder: bytes, step: bytes, layout: OnnxLayout) -> list[Path]:
    """Write ``ENCODER_FILE``, ``STEP_FILE`` and ``LAYOUT_FILE`` (the layout and the model's
    config as JSON) into ``folder`` (created); returns the three paths."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / ENCODER_FILE, out / STEP_FILE, out / LAYOUT_FILE]
    paths[0].write_bytes(encoder)
    paths[1].write_bytes(step)
    paths[2].write_text(json.dumps(asdict(layout), indent=2) + "\n")
    return paths


def read_graphs(folder: str | os.PathLike[str]) -> tuple[bytes, bytes, OnnxLayout]:
    """The encoder and decoder-step graphs of a ``write_graphs`` folder and their layout.
    Raises ``OSError`` for a missing file and ``ValueError`` for a layout that does not parse."""
    out = Path(folder)
    layout = OnnxLayout.from_dict(json.loads((out / LAYOUT_FILE).read_text()))
    return (out / ENCODER_FILE).read_bytes(), (out / STEP_FILE).read_bytes(), layout
