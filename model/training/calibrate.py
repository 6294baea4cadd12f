"""``safl calibrate``: fit a checkpoint's calibration (``model.calibration``) on labelled crops
and write it into its sidecar, with how it measures on a part it was not fitted on.

The crops are read as the service reads them (their views, the choice by the decoder's
probability), so the fit sees the probabilities users' readings come with. The crops of the
report part are never fitted on, even where the fit part holds them (``val-unseen`` lies
inside ``val``). Redo it whenever a new model ships:

    safl calibrate weights/safl.safetensors --data data/train/iiit5k data/train/svt data/train/ic15
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..calibration import Calibration, bootstrap_ece, coverage, perfect_ece, reliability, write_calibration
from .protocol import normalize_cs
from .split import PARTS, part_indices

#: Confidence thresholds the report gives coverage and accuracy at.
THRESHOLDS = (0.5, 0.8, 0.9, 0.95)


def add_calibrate_parser(sub: argparse._SubParsersAction, default_weights: Path | None) -> None:
    from .cli import add_split_flags, add_view_flags

    p = sub.add_parser(
        "calibrate",
        help="fit the confidence calibration of a checkpoint and write it into its sidecar",
        description="Fit confidence = sigmoid(a logit(p) + b) of the decoder's probability p on labelled folders' fit part, "
        "report it on their report part, and write it into the checkpoint's .json sidecar (the weights and the model id are untouched).",
    )
    p.add_argument("weights", type=Path, nargs="?", default=default_weights, help="checkpoint (.safetensors); default: the shipped one")
    p.add_argument("--data", type=Path, nargs="+", required=True, metavar="DIR", help="labels.tsv folders")
    p.add_argument(
        "--fit-part",
        choices=PARTS,
        default="val",
        help="part to fit on, less the report part's crops (default: %(default)s; a model of the legacy lineage trained on most of "
        "val but val-unseen: see MODEL_CARD.md)",
    )
    p.add_argument("--report-part", choices=PARTS, default="val-unseen", help="part to measure the calibration on (default: %(default)s)")
    add_split_flags(p)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="also write the report here")
    p.add_argument("--reliability", type=Path, metavar="PNG", help="also draw the report part's reliability diagram, before and after, here")
    p.add_argument("--dry-run", action="store_true", help="fit and report, but leave the sidecar as it is")
    add_view_flags(p)
    p.set_defaults(func=run_calibrate)


def _summary(confidence: np.ndarray, right: np.ndarray) -> dict[str, Any]:
    lo, hi = bootstrap_ece(confidence, right)
    rel = reliability(confidence, right)
    return {
        "ece": rel.ece,
        "ece_95ci": [lo, hi],
        "mean_confidence": float(confidence.mean()),
        "coverage": coverage(confidence, right, THRESHOLDS),
        "reliability": rel.to_dict(),
    }


def calibration_report(fit_on: str, p_fit: np.ndarray, y_fit: np.ndarray, p_report: np.ndarray, y_report: np.ndarray) -> tuple[Calibration, dict[str, Any]]:
    """Fit on ``(p_fit, y_fit)`` (decoder probabilities, exact match) and measure the raw and
    the calibrated confidence on ``(p_report, y_report)``: ECE with its bootstrap interval,
    the ECE of a perfectly calibrated model with the same confidences, coverage and accuracy
    at ``THRESHOLDS``, and the reliability bins."""
    cal = Calibration.fit(p_fit, y_fit, fitted_on=fit_on)
    after = cal(p_report)
    report = {
        "fit": {"crops": len(p_fit), "share_right": float(y_fit.mean())},
        "report": {"crops": len(p_report), "share_right": float(y_report.mean()), "perfect_ece": perfect_ece(after)},
        "raw": _summary(p_report, y_report),
        "calibrated": _summary(after, y_report),
    }
    return cal, report


def run_calibrate(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import CheckpointError, load_checkpoint
    from .cli import split_config, view_config
    from .data import load_folder_part
    from .evaluate import predict

    torch.set_num_threads(args.threads)
    view_cfg, split = view_config(args), split_config(args)
    try:
        model, info = load_checkpoint(args.weights)
        sets = [load_folder_part(d, info.config.preprocess, "all", split, view_cfg) for d in args.data]
    except (CheckpointError, OSError, ValueError) as exc:
        raise SystemExit(f"safl calibrate: {exc}") from None
    parts: dict[str, tuple[list[float], list[bool]]] = {"fit": ([], []), "report": ([], [])}
    for ds in sets:
        report = set(part_indices(ds.labels, args.report_part, split))
        fit = [i for i in part_indices(ds.labels, args.fit_part, split) if i not in report]
        for name, idx in (("fit", fit), ("report", sorted(report))):
            idx = [i for i in idx if normalize_cs(ds.labels[i])]  # as acc_cs scores: a label with nothing to match is left out
            sub = ds.subset(idx)
            texts, probs = predict(model, sub.images, args.batch_size, extra_views=sub.extra_views, confident_at=view_cfg.confident_at)
            parts[name][0].extend(probs)
            parts[name][1].extend(normalize_cs(t) == normalize_cs(label) for t, label in zip(texts, sub.labels))
        print(f"{ds.name}: fit on {len(fit)} crops, report on {len(report)}", flush=True)
    names = ", ".join(Path(d).name for d in args.data)
    fit_on = f"{names}: part {args.fit_part} less {args.report_part}, {len(parts['fit'][0])} crops"
    try:
        cal, report = calibration_report(fit_on, *(np.asarray(v) for v in (*parts["fit"], *parts["report"])))
    except ValueError as exc:
        raise SystemExit(f"safl calibrate: {exc}") from None
    report = {"model": info.model_id, "calibration": cal.to_dict(), "report_part": f"{names}: part {args.report_part}", **report}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    if args.reliability:
        from ..calibration import Reliability
        from .reliability_plot import plot_reliability

        bins = [(kind, Reliability.from_dict(report[kind]["reliability"])) for kind in ("raw", "calibrated")]
        plot_reliability(bins, args.reliability, f"{info.model_id} on {args.report_part} ({report['report']['crops']} crops)")
    if not args.dry_run:
        summary = {k: report[k] for k in ("report_part",)} | {
            "ece_raw": report["raw"]["ece"],
            "ece": report["calibrated"]["ece"],
            "ece_95ci": report["calibrated"]["ece_95ci"],
        }
        path = write_calibration(info.weights_path, cal, summary)
        print(f"safl calibrate: wrote the calibration into {path}; {info.model_id} is unchanged")
    return 0
