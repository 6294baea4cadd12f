"""The model-speed levers of issue 19 side by side in one run: crops/s and readings.

    python bench/torch_levers.py --weights weights/safl.safetensors
    python bench/torch_levers.py --weights weights/safl.safetensors --data ../shared/data/train/ic15 --json levers.json

Every variant reads the same pre-processed crops (rendered words, or the ``val-unseen`` part
of ``--data`` folders: one view per crop, ``SAFL.recognize``), timed as the median of
``--repeats`` calls after warm-up, one variant after the other:

- ``torch``: PyTorch eager, the reference for readings;
- ``torch fused-qkv``: each self-attention's three projections as one matrix product
  (a ``[3D, D]`` weight), in the encoder and in every decoder step;
- ``torch int8``: ``torch.ao.quantization.quantize_dynamic`` of every ``nn.Linear`` (int8
  weights, activations quantised per call);
- ``torch compile``: ``torch.compile`` (inductor, C++ on the CPU) of the encoder and of the
  decoder's step function, ``dynamic=True`` so one graph serves every batch size and
  prefix length; compile time is reported apart and not in crops/s;
- ``onnx``: ONNX Runtime (``model.onnx_backend``, the CPU default of ``safl serve``);
- ``onnx fused-qkv``: the same with the fused model exported.

The ratio columns divide by ``torch`` and by ``onnx`` at the same batch. "differ" counts
crops whose text is not the reference's, "acc36" is word accuracy on the labels (36-char
protocol, ``model.training.evaluate.score``) when ``--data`` is given.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.model_speed import WORDS, cpu_name, word_image  # noqa: E402
from model import SAFL, load_checkpoint  # noqa: E402
from model.attention import MultiHeadAttention  # noqa: E402
from model.decode import DecoderLayer  # noqa: E402
from model.encode import EncoderLayer  # noqa: E402
from model.onnx_backend import OnnxRecognizer  # noqa: E402
from model.preprocess import collate, preprocess, to_tensor  # noqa: E402

VARIANTS = ("torch", "torch fused-qkv", "torch int8", "torch compile", "onnx", "onnx fused-qkv")


@dataclass
class Row:
    variant: str
    batch: int
    ms_per_batch: float
    crops_per_s: float
    vs_torch: float
    vs_onnx: float | None
    differ: int
    acc36: float | None
    setup_s: float


def _qkv(attn: MultiHeadAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = F.linear(x, attn.qkv_weight, attn.qkv_bias).chunk(3, dim=-1)
    return attn.split(q), attn.split(k), attn.split(v)


def _merge(attn: MultiHeadAttention, out: torch.Tensor) -> torch.Tensor:
    b, _, n, _ = out.shape
    return attn.out_proj(out.transpose(1, 2).reshape(b, n, -1))


def _encoder_forward(self: EncoderLayer, x: torch.Tensor) -> torch.Tensor:
    h = self.norm1(x)
    q, k, v = _qkv(self.attn, h)
    x = x + _merge(self.attn, F.scaled_dot_product_attention(q, k, v))
    return x + self.ffn(self.norm2(x))


def _decoder_forward(self: DecoderLayer, x: torch.Tensor, memory_kv, cache: list[torch.Tensor] | None = None) -> torch.Tensor:
    h = self.norm1(x)
    q, k, v = _qkv(self.self_attn, h)
    if cache is not None:
        if cache:
            k = torch.cat([cache[0], k], dim=2)
            v = torch.cat([cache[1], v], dim=2)
        cache[:] = [k, v]
    x = x + _merge(self.self_attn, F.scaled_dot_product_attention(q, k, v, is_causal=cache is None))
    x = x + self.cross_attn.attend(self.norm2(x), *memory_kv)
    return x + self.ffn(self.norm3(x))


def fuse_qkv(model: SAFL) -> SAFL:
    """A copy whose self-attention projects queries, keys and values with one ``[3D, D]`` matrix."""
    fused = copy.deepcopy(model).eval()
    for layer in fused.modules():
        if isinstance(layer, (EncoderLayer, DecoderLayer)):
            attn = layer.attn if isinstance(layer, EncoderLayer) else layer.self_attn
            projs = (attn.q_proj, attn.k_proj, attn.v_proj)
            attn.register_buffer("qkv_weight", torch.cat([p.weight.detach() for p in projs]))
            attn.register_buffer("qkv_bias", torch.cat([p.bias.detach() for p in projs]))
            fwd = _encoder_forward if isinstance(layer, EncoderLayer) else _decoder_forward
            layer.forward = types.MethodType(fwd, layer)
    return fused


def int8(model: SAFL) -> SAFL:
    """A copy with every ``nn.Linear`` dynamically quantised to int8."""
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)


def compiled(model: SAFL) -> SAFL:
    """A copy with the encoder and the decoder step compiled by inductor."""
    m = copy.deepcopy(model).eval()
    m.encoder = torch.compile(m.encoder, dynamic=True)
    m.decoder.run = torch.compile(m.decoder.run, dynamic=True)
    return m


def build(variant: str, model: SAFL, threads: int) -> Callable[[torch.Tensor], list[str]]:
    base = fuse_qkv(model) if "fused-qkv" in variant else model
    if variant.startswith("onnx"):
        reader = OnnxRecognizer(base, variant, threads)
        return lambda x: [r.text for r in reader.recognize(x)]
    if variant == "torch int8":
        base = int8(model)
    elif variant == "torch compile":
        base = compiled(model)
    return lambda x: [r.text for r in base.recognize(x)]


def rendered_crops(model: SAFL, n: int) -> tuple[torch.Tensor, list[str] | None]:
    cfg = model.config.preprocess
    return collate([preprocess(word_image(WORDS[i % len(WORDS)]), cfg) for i in range(n)]), None


def folder_crops(model: SAFL, folders: list[Path], limit: int) -> tuple[torch.Tensor, list[str]]:
    from model.training.data import load_folder_part

    parts = [load_folder_part(folder, model.config.preprocess, "val-unseen", view_cfg=None) for folder in folders]
    images = np.concatenate([ds.images for ds in parts])[:limit]
    return to_tensor(images), [t for ds in parts for t in ds.labels][:limit]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=REPO / "weights" / "safl.safetensors", help="checkpoint (default: the shipped weights)")
    p.add_argument("--data", type=Path, nargs="*", default=[], help="labelled folders: read their val-unseen crops (default: rendered words)")
    p.add_argument("--limit", type=int, default=400, help="crops read for the readings check (default: 400)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes timed (default: 1 32)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per batch size; the median counts (default: 5)")
    p.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads (default: 2)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="what to measure (default: all)")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    model, info = load_checkpoint(args.weights, torch.device("cpu"))
    model.eval()
    x, labels = folder_crops(model, args.data, args.limit) if args.data else rendered_crops(model, args.limit)
    rows: list[Row] = []
    reference: list[str] | None = None
    for variant in args.variants:
        t0 = time.perf_counter()
        read = build(variant, model, args.threads)
        with torch.no_grad():
            texts = [t for i in range(0, len(x), 32) for t in read(x[i : i + 32])]  # also the compile warm-up
        setup = time.perf_counter() - t0
        reference = texts if reference is None else reference
        differ = sum(a != b for a, b in zip(texts, reference))
        acc = None
        if labels is not None:
            from model.training.evaluate import score

            acc = round(100 * score(texts, labels)[1], 2)
        for b in args.batches:
            xb = x[:b]
            with torch.no_grad():
                read(xb)
                times = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    read(xb)
                    times.append(time.perf_counter() - t)
            med = statistics.median(times)
            rows.append(Row(variant, b, round(1000 * med, 2), round(b / med, 1), 0.0, None, differ, acc, round(setup, 1)))
            print(f"  {variant} batch {b}: {rows[-1].crops_per_s} crops/s (setup {setup:.1f} s, {differ} readings differ)", file=sys.stderr, flush=True)
    by = {(r.variant, r.batch): r for r in rows}
    for r in rows:
        if ("torch", r.batch) in by:
            r.vs_torch = round(r.crops_per_s / by[("torch", r.batch)].crops_per_s, 2)
        if ("onnx", r.batch) in by:
            r.vs_onnx = round(r.crops_per_s / by[("onnx", r.batch)].crops_per_s, 2)

    source = f"val-unseen of {', '.join(d.name for d in args.data)}" if args.data else "rendered words"
    print(f"### Model-speed levers: {info.model_id}, {args.threads} threads, torch {torch.__version__}, {cpu_name()}\n")
    print(f"{len(x)} crops ({source}) for the readings; timings: median of {args.repeats} calls\n")
    print("| variant | batch | ms / batch | crops/s | × torch | × onnx | readings differ | acc36 % | setup s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r.variant} | {r.batch} | {r.ms_per_batch} | {r.crops_per_s} | {r.vs_torch:.2f} | {'' if r.vs_onnx is None else f'{r.vs_onnx:.2f}'} "
            f"| {r.differ} | {'' if r.acc36 is None else r.acc36} | {r.setup_s} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"model": info.model_id, "threads": args.threads, "source": source, "rows": [asdict(r) for r in rows]}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
