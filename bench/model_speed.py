"""Recognition speed of the model itself (no HTTP): crops/s of ``SAFL.recognize`` per batch size.

    python bench/model_speed.py                                   # small preset, 2 threads, batches 1 8 32 64
    python bench/model_speed.py --weights weights/safl.safetensors
    python bench/model_speed.py --batches 1 8 --repeats 2 --threads 1 --json speed.json
    python bench/model_speed.py --weights weights/safl.safetensors --backends torch onnx   # both engines, one run

Greedy decoding costs one decoder step per output character, so the time depends on
how long the decoded strings are. An untrained model may stop at once or never, so
the untrained rows fix the length:

- ``untrained, worst case``: EOS is suppressed, every crop decodes ``max_len``
  characters plus the forced end (the slowest possible batch);
- ``untrained, N chars``: decoding is capped at ``--typical-len`` characters (a
  typical word), which is what a trained model costs on ordinary crops;
- ``weights``: with ``--weights``, the real model on rendered words, decoding as
  long as it decides to (its mean decoded length is reported).

Inputs are words drawn with Pillow's font and put through ``model.preprocess``, the
path the service uses; that pre-processing is not timed. Timings are the median of
``--repeats`` calls after one warm-up call.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from model import SAFL, Recognition, SAFLConfig, load_checkpoint  # noqa: E402  (after the sys.path line above)
from model.charset import EOS_ID  # noqa: E402
from model.engine import ENGINES, Engine, open_engine  # noqa: E402
from model.preprocess import collate, preprocess  # noqa: E402

WORDS = ["hello", "World", "street", "CAFE", "exit", "open24", "Parking", "sale!", "Station", "42", "NO", "Coffee"]


@dataclass
class Row:
    """One (model variant, batch size) measurement."""

    variant: str
    backend: str
    batch: int
    decode_steps: int
    mean_chars: float
    ms_per_batch: float
    ms_per_batch_min: float
    crops_per_s: float
    ms_per_crop: float


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def word_image(text: str) -> Image.Image:
    img = Image.new("L", (24 + 14 * len(text), 32), 255)
    font = ImageFont.load_default(size=24)
    ImageDraw.Draw(img).text((8, 2), text, fill=0, font=font)
    return img


def make_batch(model: SAFL, n: int) -> torch.Tensor:
    cfg = model.config.preprocess
    crops = [preprocess(word_image(WORDS[i % len(WORDS)]), cfg) for i in range(n)]
    return collate(crops).to(next(model.parameters()).device)


def never_ending(model: SAFL) -> SAFL:
    """A copy whose EOS logit is pushed far down: greedy decoding runs to ``max_len``."""
    worst = copy.deepcopy(model)
    with torch.no_grad():
        worst.decoder.head.bias[EOS_ID] -= 1e4
    return worst.eval()


def recognize(engine: Engine, x: torch.Tensor, amp: torch.dtype | None, max_chars: int | None) -> list[Recognition]:
    """``engine.recognize``; with ``max_chars`` the same steps with decoding capped at that length (PyTorch only)."""
    if max_chars is None:
        return engine.recognize(x, amp_dtype=amp)
    assert engine.name == "torch"
    model = engine.model
    with torch.no_grad():
        ctx = torch.autocast(x.device.type, dtype=amp) if amp is not None else torch.autocast(x.device.type, enabled=False)
        with ctx:
            ids, probs = model.decoder.greedy(model.encode(x), max_len=max_chars)
    return model.charset.decode_batch(ids, probs)


def measure(variant: str, model: Engine, batch: int, repeats: int, amp: torch.dtype | None, max_chars: int | None = None) -> Row:
    x = make_batch(model.model, batch)
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    recs = recognize(model, x, amp, max_chars)  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        recs = recognize(model, x, amp, max_chars)
        sync()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    chars = [len(r.text) for r in recs]
    return Row(
        variant=variant,
        backend=model.name,
        batch=batch,
        decode_steps=max(chars) + 1,
        mean_chars=round(sum(chars) / len(chars), 2),
        ms_per_batch=round(1000 * med, 2),
        ms_per_batch_min=round(1000 * min(times), 2),
        crops_per_s=round(batch / med, 1),
        ms_per_crop=round(1000 * med / batch, 3),
    )


def to_markdown(rows: list[Row], header: dict) -> str:
    lines = [
        f"### SAFL recognize speed: {header['model']}, {header['device']}, {header['threads']} threads, {header['amp']}",
        "",
        f"{header['params_m']} M parameters; max_len {header['max_len']}; torch {header['torch']}; {header['cpu']}",
        "",
        "| variant | backend | batch | decode steps | mean chars | ms / batch (median) | ms / batch (min) | crops/s | ms / crop |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.variant} | {r.backend} | {r.batch} | {r.decode_steps} | {r.mean_chars} | {r.ms_per_batch} | {r.ms_per_batch_min} | {r.crops_per_s} | {r.ms_per_crop} |"
        )
    torch_rows = {(r.variant, r.batch): r for r in rows if r.backend == "torch"}
    pairs = [(r, torch_rows[(r.variant, r.batch)]) for r in rows if r.backend == "onnx" and (r.variant, r.batch) in torch_rows]
    if pairs:
        lines += ["", "| variant | batch | onnx / torch crops/s |", "|---|---:|---:|"]
        lines += [f"| {o.variant} | {o.batch} | {o.crops_per_s / t.crops_per_s:.2f}x |" for o, t in pairs]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="preset of the untrained model (default: small)")
    p.add_argument("--weights", type=Path, help="also time this checkpoint on rendered words (real decode length)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64], help="batch sizes (default: 1 8 32 64)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per batch size (default: 5)")
    p.add_argument("--amp", choices=("off", "bf16"), default="off", help="bf16 autocast (default: off, fp32)")
    p.add_argument("--typical-len", type=int, default=8, help="decode cap of the 'typical' untrained row; 0 leaves it out (default: 8)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backends", nargs="+", choices=ENGINES, default=["torch"], help="inference engines, measured in turn in this run (default: torch)")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    amp = torch.bfloat16 if args.amp == "bf16" else None
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    untrained = SAFL(SAFLConfig.from_preset(args.preset)).to(device).eval()
    variants: list[tuple[str, SAFL, int | None]] = [(f"untrained {args.preset}, worst case (max_len)", never_ending(untrained), None)]
    if args.typical_len > 0:
        variants.append((f"untrained {args.preset}, {args.typical_len} chars", never_ending(untrained), args.typical_len))
    name = f"{args.preset} (untrained)"
    ref = untrained
    if args.weights is not None:
        trained, info = load_checkpoint(args.weights, device)
        variants.append((f"weights {info.model_id}", trained, None))
        name = f"{info.model_id} + untrained {args.preset}"
        ref = trained

    header = {
        "model": name,
        "device": str(device),
        "threads": args.threads,
        "amp": "bf16 autocast" if amp is not None else "fp32",
        "params_m": round(ref.num_parameters() / 1e6, 2),
        "max_len": ref.config.max_len,
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "repeats": args.repeats,
    }
    rows = []
    for variant, model, cap in variants:
        for backend in args.backends:
            if backend == "onnx" and cap is not None:
                continue  # the ONNX loop decodes to the end token; a cap is a PyTorch-only experiment
            reader = open_engine(model, variant, backend, device.type, args.threads)
            for b in args.batches:
                rows.append(measure(variant, reader, b, args.repeats, amp, cap))
                print(f"  {variant} {reader.name} batch {b}: {rows[-1].crops_per_s} crops/s", file=sys.stderr, flush=True)
    print(to_markdown(rows, header))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**header, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
