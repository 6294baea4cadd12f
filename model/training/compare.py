"""Paired comparison of two checkpoints on the same validation crops, with a confidence
interval, for the focal-vs-cross-entropy question.

    python -m model.training.compare runs/small-focal-s0-p2/best.safetensors runs/small-ce-s0-p2/best.safetensors \
        --val data/train/iiit5k data/train/svt data/train/ic15

For each set: both models' 36-char accuracy, the difference, a 95 % paired-bootstrap
interval of the difference (resampling crops, so both models see the same resample),
and the discordant pairs (crops only A reads, only B reads).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint
from .cli import add_comparison_part_flag, add_split_flags, split_config
from .data import load_folder_part
from .evaluate import normalize_36, predict
from .split import DEFAULT_SPLIT, FAIR_PART, SplitConfig


def paired_bootstrap(a: list[bool], b: list[bool], rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of mean(a) - mean(b) over paired resamples."""
    rng = random.Random(seed)
    n = len(a)
    diffs = []
    for _ in range(rounds):
        idx = [rng.randrange(n) for _ in range(n)]
        diffs.append(sum(a[i] - b[i] for i in idx) / n)
    diffs.sort()
    return diffs[int(0.025 * rounds)], diffs[int(0.975 * rounds) - 1]


def compare(path_a: Path, path_b: Path, folders: list[Path], split: SplitConfig = DEFAULT_SPLIT, part: str = FAIR_PART) -> list[dict]:
    """Per-set paired comparison rows."""
    model_a, info_a = load_checkpoint(path_a)
    model_b, _ = load_checkpoint(path_b)
    rows = []
    for folder in folders:
        ds = load_folder_part(folder, info_a.config.preprocess, part, split)
        scored = ds.subset([i for i, lab in enumerate(ds.labels) if normalize_36(lab)])
        pa, _ = predict(model_a, scored.images, extra_views=scored.extra_views)
        pb, _ = predict(model_b, scored.images, extra_views=scored.extra_views)
        gold = [normalize_36(lab) for lab in scored.labels]
        ca = [normalize_36(p) == g for p, g in zip(pa, gold)]
        cb = [normalize_36(p) == g for p, g in zip(pb, gold)]
        lo, hi = paired_bootstrap(ca, cb)
        n = len(gold)
        rows.append(
            {
                "set": ds.name,
                "n": n,
                "acc_a": sum(ca) / n,
                "acc_b": sum(cb) / n,
                "diff": (sum(ca) - sum(cb)) / n,
                "ci95": [lo, hi],
                "only_a": sum(x and not y for x, y in zip(ca, cb)),
                "only_b": sum(y and not x for x, y in zip(ca, cb)),
            }
        )
    return rows


def to_markdown(rows: list[dict], name_a: str, name_b: str) -> str:
    """The comparison as a markdown table."""
    lines = [
        f"| set | n | {name_a} | {name_b} | difference | 95 % CI (paired bootstrap) | only {name_a} right | only {name_b} right |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['set']} | {r['n']} | {100 * r['acc_a']:.2f} % | {100 * r['acc_b']:.2f} % | {100 * r['diff']:+.2f} | "
            f"[{100 * r['ci95'][0]:+.2f}, {100 * r['ci95'][1]:+.2f}] | {r['only_a']} | {r['only_b']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--val", type=Path, nargs="+", required=True)
    p.add_argument("--names", nargs=2, default=["focal", "CE"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    add_comparison_part_flag(p)
    add_split_flags(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = compare(args.a, args.b, args.val, split_config(args), args.part)
    print(to_markdown(rows, *args.names))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
