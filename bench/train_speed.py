"""Training images/s of one optimisation step, variant by variant, side by side in one run.

    python bench/train_speed.py                                   # small preset, 2 threads
    python bench/train_speed.py --labels data/synth-r5/shard-00000.txt --json train_speed.json

A step is what ``Trainer.train_step`` does: forward under the trainer's autocast, the focal
loss (``model.loss.sequence_loss``), backward, gradient clipping, AdamW. Inputs are random
images in [-1, 1] (the cost does not depend on the pixels) and labels drawn from real
synthetic labels (``--labels``, one per line; the decoder's length follows the batch's
longest label), the same batches for every variant. Each variant runs ``--warmup`` steps,
then the median of ``--steps`` timed steps. A variant may be named more than once
(``--variants bf16 X bf16 X``): the rounds then alternate, which shows the run-to-run spread.

Variants (``--variants``):

- ``fp32``: no autocast (``fp32 channels-last fused-adamw``: with both levers below);
- ``bf16``: ``torch.autocast("cpu", torch.bfloat16)``, what ``safl train`` uses where the CPU
  has bf16 instructions (``--amp auto``);
- ``bf16 channels-last``: the images and the convolutional stem in channels-last layout;
- ``bf16 fused-adamw``: ``AdamW(fused=True)``; ``bf16 channels-last fused-adamw``: both;
- ``bf16 compile``: ``torch.compile`` of the model (inductor; compile time reported apart);
- ``bf16 batch 32`` / ``bf16 batch 128``: another batch size (images/s is what compares).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.model_speed import cpu_name  # noqa: E402
from model import SAFL, SAFLConfig  # noqa: E402
from model.loss import sequence_loss  # noqa: E402

VARIANTS = (
    "fp32",
    "fp32 channels-last fused-adamw",
    "bf16",
    "bf16 channels-last",
    "bf16 fused-adamw",
    "bf16 channels-last fused-adamw",
    "bf16 compile",
    "bf16 batch 32",
    "bf16 batch 128",
)
FALLBACK_LABELS = ["hello", "World", "street", "CAFE", "exit", "open24", "Parking", "sale!", "Station", "42", "www.example.com", "$12.99"]


@dataclass
class Row:
    variant: str
    batch: int
    ms_per_step: float
    images_per_s: float
    vs_bf16: float
    setup_s: float


def batches(model: SAFL, labels: list[str], batch: int, n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config.preprocess
    out = []
    for _ in range(n):
        images = torch.rand(batch, cfg.channels, cfg.height, cfg.width, generator=gen) * 2 - 1
        inp, tgt = model.charset.encode_batch([rng.choice(labels) for _ in range(batch)])
        out.append((images, inp, tgt))
    return out


def run(variant: str, preset: str, labels: list[str], batch_default: int, warmup: int, steps: int, seed: int) -> Row:
    torch.manual_seed(seed)
    model = SAFL(SAFLConfig.from_preset(preset)).train()
    batch = int(variant.rsplit(" ", 1)[1]) if "batch" in variant else batch_default
    amp = None if variant.startswith("fp32") else torch.bfloat16
    channels_last = "channels-last" in variant
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    net = torch.compile(model) if "compile" in variant else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=0.05, fused="fused" in variant)
    data = batches(model, labels, batch, warmup + steps, seed)

    def step(images: torch.Tensor, inp: torch.Tensor, tgt: torch.Tensor) -> None:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            logits = net(images, inp)
        loss = sequence_loss(logits, tgt, "focal", 2.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for b in data[:warmup]:
        step(*b)
    setup = time.perf_counter() - t0
    times = []
    for b in data[warmup:]:
        t = time.perf_counter()
        step(*b)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return Row(variant, batch, round(1000 * med, 1), round(batch / med, 1), 0.0, round(setup, 1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="model size (default: small, what the CPU campaign trains)")
    p.add_argument("--labels", type=Path, help="label file, one per line (default: a dozen built-in words)")
    p.add_argument("--batch-size", type=int, default=64, help="batch of the variants without one in their name (default: 64)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (default: 3)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant; the median counts (default: 10)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and batches (default: 0)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="in this order; repeat names for alternating rounds (default: all)")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    labels = [w for w in args.labels.read_text(encoding="utf-8").splitlines() if w] if args.labels else FALLBACK_LABELS
    rows = []
    for variant in args.variants:
        rows.append(run(variant, args.preset, labels, args.batch_size, args.warmup, args.steps, args.seed))
        r = rows[-1]
        print(f"  {variant}: {r.images_per_s} images/s ({r.ms_per_step} ms a step, setup {r.setup_s} s)", file=sys.stderr, flush=True)
    ref = next((r for r in rows if r.variant == "bf16"), rows[0])
    for r in rows:
        r.vs_bf16 = round(r.images_per_s / ref.images_per_s, 2)
    print(f"### Training step speed: {args.preset}, {args.threads} threads, torch {torch.__version__}, {cpu_name()}\n")
    print(f"median of {args.steps} steps after {args.warmup} warm-up steps; labels from {args.labels or 'built-in words'}\n")
    print(f"| variant | batch | ms / step | images/s | × {ref.variant} | setup s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r.variant} | {r.batch} | {r.ms_per_step} | {r.images_per_s} | {r.vs_bf16:.2f} | {r.setup_s} |")
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "threads": args.threads, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
