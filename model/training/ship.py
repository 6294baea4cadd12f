"""Promote a trained checkpoint to ``weights/`` only if it beats the shipped one.

Both are evaluated on the same validation parts of the real folders (never trained
on); the candidate is re-saved there (weights + sidecar) when its 36-char accuracy over
all those crops together (``evaluate.pooled``, the benchmarks' "weighted" figure) is
higher, and ``weights/metrics.json`` records the numbers for the model card.

Why pooled and not the mean of the sets: SVT's validation part has 20 crops, so in a mean
of three sets one SVT crop outweighed five IIIT5K or nine IC15 crops, and the decision
turned on it (stop 23's candidate: 215 crops right of 304 against 207, "lower" by one SVT crop).

    python -m model.training.ship runs/small-focal-s0/best.safetensors \
        --val data/train/iiit5k data/train/svt data/train/ic15
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, load_checkpoint, save_checkpoint, shipped_weights
from .cli import add_comparison_part_flag, add_split_flags, split_config
from .data import load_folder_part
from .evaluate import evaluate, pooled, to_json, to_markdown
from .split import FAIR_PART, SplitConfig

DEFAULT_WEIGHTS = shipped_weights()


def pooled_acc(path: Path, folders: list[Path], split: SplitConfig, part: str = FAIR_PART) -> tuple[float, list, dict]:
    """36-char accuracy over all the validation parts' crops together, the per-set results and the training metadata."""
    model, info = load_checkpoint(path)
    sets = [load_folder_part(f, info.config.preprocess, part, split) for f in folders]
    results = evaluate(model, sets, worst=3)
    return pooled(results), results, {"model": info.model_id, **info.training}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("candidate", type=Path)
    p.add_argument("--val", type=Path, nargs="+", required=True)
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    add_comparison_part_flag(p)
    add_split_flags(p)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    split = split_config(args)

    cand, cand_results, cand_meta = pooled_acc(args.candidate, args.val, split, args.part)
    print(to_markdown(cand_results, f"candidate {cand_meta['model']}"))
    try:
        cur, _, cur_meta = pooled_acc(args.weights, args.val, split, args.part)
        print(f"shipped {cur_meta['model']}: pooled acc36 {100 * cur:.2f} %")
    except CheckpointError as exc:
        cur = -1.0
        print(f"no usable shipped weights ({exc}); the candidate will be shipped")
    print(f"candidate: pooled acc36 {100 * cand:.2f} %")
    if cand <= cur:
        print("not better: weights/ left unchanged")
        return 1
    # Re-saved rather than copied, so the shipped file carries the current checkpoint format.
    model, info = load_checkpoint(args.candidate)
    shipped = save_checkpoint(model, args.weights, name=info.name, training=info.training)
    cand_meta["model"] = shipped.model_id
    to_json(
        cand_results, args.weights.parent / "metrics.json", {"model": cand_meta["model"], "split": {"part": args.part, **asdict(split)}, "training": cand_meta}
    )
    print(f"shipped {shipped.model_id} → {args.weights} (sha256 {shipped.sha256})")
    calibrate_shipped(args.weights, args.val, split, args.threads)
    return 0


def calibrate_shipped(weights: Path, val: list[Path], split: SplitConfig, threads: int) -> None:
    """Fit the shipped model's confidence calibration (``safl calibrate``) on ``val``: the
    sidecar ``save_checkpoint`` writes has none, and another model's would not fit this one.
    When none can be fitted (too few crops, none right or none wrong) it says so in one line
    and the model answers its raw probability until ``safl calibrate`` fits one."""
    from .calibrate import add_calibrate_parser, run_calibrate

    parser = argparse.ArgumentParser(prog="safl")
    add_calibrate_parser(parser.add_subparsers(), None)
    flags = ["--val-fraction", str(split.val_fraction), "--split-seed", str(split.seed), "--split-block", str(split.block), "--threads", str(threads)]
    try:
        run_calibrate(parser.parse_args(["calibrate", str(weights), "--data", *map(str, val), *flags]))
    except SystemExit as exc:  # run_calibrate's one-line refusals
        print(f"warning: no calibration fitted ({exc}); {weights.name} answers its raw probability until `safl calibrate` fits one", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
