"""How much the further views buy, threshold by threshold: word accuracy against model inputs per crop.

    python bench/views_threshold.py --data ../shared/data/train/iiit5k ../shared/data/train/svt ../shared/data/train/ic15
    python bench/views_threshold.py --data ... --part val --thresholds 0 0.3 0.5 0.6 1 --json views.json

Every view of every crop of ``--part`` (default ``val-unseen``, the crops no model of the
shipped lineage trained on) is read once; then, for each ``confident_at``, the answers are
what ``model.reading.read_views`` (the service's path) returns at that threshold, taken
from those readings, and the model inputs it asks for are counted. A threshold of 0 reads
the crop alone, 1 every view of every crop. The last columns compare each threshold with
the default (``ViewConfig().confident_at``): crops it reads right that the default reads
wrong (gained) and the other way round (lost); ``--list`` prints those crops.

The further views cost model time, not accuracy of the crop alone: this is the
speed/accuracy trade of ``SAFL_VIEWS_CONFIDENT_AT`` on honest data.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from model import load_checkpoint  # noqa: E402
from model.preprocess import ViewConfig  # noqa: E402
from model.reading import Recognition, read_views  # noqa: E402
from model.training.data import load_folder_part  # noqa: E402
from model.training.evaluate import normalize_36, read_batched  # noqa: E402
from model.training.split import PARTS  # noqa: E402

DEFAULT_THRESHOLDS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def all_readings(model, views_per_crop: list[list[np.ndarray]], batch_size: int) -> list[list[Recognition]]:
    """Every view of every crop, read once (PyTorch; ONNX Runtime reads the same, ``tests/test_onnx.py``)."""
    flat = np.stack([v for views in views_per_crop for v in views])
    readings = read_batched(model, flat, batch_size, None)
    out, start = [], 0
    for views in views_per_crop:
        out.append(readings[start : start + len(views)])
        start += len(views)
    return out


def at_threshold(readings: list[list[Recognition]], confident_at: float) -> tuple[list[str], int]:
    """The answers ``read_views`` gives at ``confident_at`` and the model inputs it reads."""
    asked = 0

    def read(keys: list[tuple[int, int]]) -> list[Recognition]:
        nonlocal asked
        asked += len(keys)
        return [readings[i][j] for i, j in keys]

    answers = read_views(read, [[(i, j) for j in range(len(r))] for i, r in enumerate(readings)], confident_at)
    return [a.text for a in answers], asked


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=REPO / "weights" / "safl.safetensors", help="checkpoint (default: the shipped weights)")
    p.add_argument("--data", type=Path, nargs="+", required=True, help="labelled folders (labels.tsv)")
    p.add_argument("--part", choices=PARTS, default="val-unseen", help="part of each folder (default: val-unseen)")
    p.add_argument("--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS), help="confident_at values; the default one is always added")
    p.add_argument(
        "--contrast-views",
        dest="contrast",
        action=argparse.BooleanOptionalAction,
        default=ViewConfig().contrast,
        help="SAFL_CONTRAST_VIEWS (default: %(default)s)",
    )
    p.add_argument("--turn-tall", action=argparse.BooleanOptionalAction, default=ViewConfig().turn_tall, help="SAFL_TURN_TALL (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="model inputs per call (default: 128)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--list", action="store_true", help="list the crops each threshold gains or loses against the default")
    p.add_argument("--json", type=Path, help="also write the rows and the answers at the default threshold here")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    model, info = load_checkpoint(args.weights, torch.device("cpu"))
    default = ViewConfig().confident_at
    view_cfg = ViewConfig(turn_tall=args.turn_tall, contrast=args.contrast)
    thresholds = sorted(set(args.thresholds) | {default})
    rows, listing, answers = [], [], {}
    per_set: dict[str, list] = {}
    for folder in args.data:
        ds = load_folder_part(folder, model.config.preprocess, args.part, view_cfg=view_cfg)
        views = [[ds.images[i], *ds.extra_views.get(i, ())] for i in range(len(ds.images))]
        readings = all_readings(model, views, args.batch_size)
        truth = [normalize_36(t) for t in ds.labels]
        scored = [i for i, t in enumerate(truth) if t]
        per_set[folder.name] = [(truth, scored, ds.sources)] + [at_threshold(readings, t) for t in thresholds]
        print(f"  {folder.name}: {len(scored)} crops read in {sum(map(len, views))} views", file=sys.stderr, flush=True)

    ref_index = thresholds.index(default) + 1
    for k, t in enumerate(thresholds, 1):
        right = n = inputs = crops = gained = lost = 0
        for name, (meta, *results) in per_set.items():
            truth, scored, sources = meta
            texts, asked = results[k - 1]
            ref_texts, _ = results[ref_index - 1]
            inputs += asked
            crops += len(truth)
            if t == default:
                answers.update({f"{name}/{sources[i]}": {"truth": truth[i], "text": texts[i]} for i in scored})
            for i in scored:
                ok, ref_ok = normalize_36(texts[i]) == truth[i], normalize_36(ref_texts[i]) == truth[i]
                right += ok
                n += 1
                if ok != ref_ok:
                    gained += ok
                    lost += ref_ok
                    listing.append(
                        f"confident_at {t}: {'gained' if ok else 'lost'} {name}/{sources[i]} truth {truth[i]!r}, here {texts[i]!r}, default {ref_texts[i]!r}"
                    )
        rows.append(
            {
                "confident_at": t,
                "right": right,
                "n": n,
                "acc36": round(100 * right / max(n, 1), 2),
                "inputs_per_crop": round(inputs / max(crops, 1), 3),
                "gained": gained,
                "lost": lost,
            }
        )

    print(
        f"### Views threshold: {info.model_id}, part {args.part} of {', '.join(d.name for d in args.data)}, turn_tall {args.turn_tall}, contrast {args.contrast}\n"
    )
    print(f"| confident_at | right | acc36 % | model inputs per crop | gained vs {default} | lost vs {default} |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mark = " (default)" if r["confident_at"] == default else ""
        print(f"| {r['confident_at']}{mark} | {r['right']} / {r['n']} | {r['acc36']} | {r['inputs_per_crop']} | {r['gained']} | {r['lost']} |")
    if args.list:
        print("\n" + "\n".join(listing))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "model": info.model_id,
                    "part": args.part,
                    "turn_tall": args.turn_tall,
                    "contrast": args.contrast,
                    "data": [str(d) for d in args.data],
                    "rows": rows,
                    "answers_at_default": answers,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
