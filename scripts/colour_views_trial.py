"""The colour-views trial (README, "Reading several views"): would decolourised views
of a colour crop help a model trained on grey ones?

    python scripts/colour_views_trial.py [--weights weights/safl.safetensors] \
        [--readings runs/colour_views_readings.json] [--json docs/colour_views_trial.json]

Reads every validation crop (the project split, `model.training.split`) in the default views plus ten
decolourisations (principal colour components, single channels, opponent channels,
saturation, max/min channel), each stretched to the full range, and keeps every reading
(``--readings``, reused if present). Then, as for the default views: greedy selection of
decolourisations on the even-indexed half of each part, reported on the odd half too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from model.checkpoint import load_checkpoint
from model.preprocess import PreprocessConfig, ViewConfig, canonicalize, views
from model.training.data import read_labels_tsv
from model.training.evaluate import normalize_36, read_batched
from model.training.split import split_indices

SETS = ("iiit5k", "svt", "ic15")
COLOUR = ("pca", "pc2", "r", "g", "b", "rg", "yb", "sat", "max", "min")
DEFAULT = ("base", "ac5", "eq")


def _stretch(x: np.ndarray, cut: float = 1.0) -> np.ndarray:
    lo, hi = np.percentile(x, [cut, 100 - cut])
    if hi - lo < 1e-6:
        return np.full(x.shape, 128, np.uint8)
    return np.clip((x - lo) / (hi - lo) * 255, 0, 255).astype(np.uint8)


def colour_views(rgb: Image.Image, cfg: PreprocessConfig) -> dict[str, np.ndarray]:
    """Ten decolourisations of an RGB crop at the model's input size."""
    small = rgb.resize((cfg.width, cfg.height), Image.Resampling.BILINEAR)
    px = np.asarray(small).astype(np.float64)
    luma = px @ np.array([0.299, 0.587, 0.114])
    centred = px.reshape(-1, 3) - px.reshape(-1, 3).mean(0)
    _, vecs = np.linalg.eigh(centred.T @ centred)
    pc1, pc2 = ((centred @ vecs[:, k]).reshape(luma.shape) for k in (-1, -2))
    if luma.std() > 0 and pc1.std() > 0 and np.corrcoef(pc1.ravel(), luma.ravel())[0, 1] < 0:
        pc1 = -pc1  # keep the polarity of the grey crop
    r, g, b = px[..., 0], px[..., 1], px[..., 2]
    sat = np.asarray(small.convert("HSV")).astype(np.float64)[..., 1]
    raw = {"pca": pc1, "pc2": pc2, "r": r, "g": g, "b": b, "rg": r - g, "yb": (r + g) / 2 - b, "sat": sat, "max": px.max(-1), "min": px.min(-1)}
    return {k: _stretch(v) for k, v in raw.items()}


def crop_views(path: Path, cfg: PreprocessConfig) -> dict[str, np.ndarray]:
    """``name/orientation`` → model input, for the default and the colour views."""
    with Image.open(path) as im:
        rgb = canonicalize(im, 3)
    grey_views = views(rgb, cfg, ViewConfig(contrast=True))  # per orientation: the crop, autocontrast, equalised
    turned = [rgb]
    if rgb.height > rgb.width:
        turned += [rgb.transpose(t) for t in (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270)]
    out = {}
    for k, oriented in enumerate(turned):
        for name, arr in zip(DEFAULT, grey_views[3 * k : 3 * k + 3], strict=True):
            out[f"{name}/{k}"] = arr
        out.update({f"{name}/{k}": arr for name, arr in colour_views(oriented, cfg).items()})
    return out


def read_all(weights: str, data: Path) -> dict:
    model, _ = load_checkpoint(weights)
    cfg = model.config.preprocess
    out = {}
    for name in SETS:
        pairs = read_labels_tsv(data / name)
        val, _ = split_indices([t for _, t in pairs])
        crops = [crop_views(data / name / pairs[i][0], cfg) for i in val]
        keys = [(c, k) for c, vs in enumerate(crops) for k in vs]
        readings = read_batched(model, np.stack([crops[c][k] for c, k in keys]), 256, None)
        per = [{} for _ in crops]
        for (c, k), r in zip(keys, readings, strict=True):
            per[c][k] = [normalize_36(r.text), r.confidence]
        out[name] = [[normalize_36(pairs[i][1]), p] for i, p in zip(val, per, strict=True)]
    return out


def score(readings: dict, names: set[str], confident_at: float = 0.6) -> dict:
    """Accuracy per set and half (0 even, 1 odd, all), crops right, inputs per crop."""
    res = {}
    for name, crops in readings.items():
        right, inputs = [0, 0], 0
        for i, (truth, rd) in enumerate(crops):
            cands = [rd["base/0"]]
            if cands[0][1] < confident_at:
                cands += [v for k, v in rd.items() if k != "base/0" and k.split("/")[0] in names]
            inputs += len(cands)
            right[i % 2] += max(cands, key=lambda r: r[1])[0] == truth
        n = [len(crops[0::2]), len(crops[1::2])]
        res[name] = {
            "0": 100 * right[0] / n[0],
            "1": 100 * right[1] / n[1],
            "all": 100 * sum(right) / sum(n),
            "right": right,
            "inputs_per_crop": inputs / len(crops),
        }
    for h in ("0", "1", "all"):
        res[f"mean/{h}"] = sum(res[s][h] for s in readings) / len(readings)
    res["right/0"], res["right/1"] = (sum(res[s]["right"][k] for s in readings) for k in (0, 1))
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default="weights/safl.safetensors")
    p.add_argument("--data", type=Path, default=Path("../shared/data/train"))
    p.add_argument("--readings", type=Path, default=Path("runs/colour_views_readings.json"))
    p.add_argument("--json", type=Path, default=Path("docs/colour_views_trial.json"))
    args = p.parse_args()
    if args.readings.is_file():
        readings = json.loads(args.readings.read_text())
    else:
        readings = read_all(args.weights, args.data)
        args.readings.parent.mkdir(parents=True, exist_ok=True)
        args.readings.write_text(json.dumps(readings))
    rows = {"default views": score(readings, set(DEFAULT))}
    rows.update({f"+ {c}": score(readings, set(DEFAULT) | {c}) for c in COLOUR})
    chosen, best = set(DEFAULT), rows["default views"]["mean/0"]
    while True:  # greedy on the even half
        trials = {c: score(readings, chosen | {c})["mean/0"] for c in COLOUR if c not in chosen}
        if not trials or max(trials.values()) <= best:
            break
        pick = max(trials, key=trials.get)
        chosen.add(pick)
        best = trials[pick]
        rows["greedy: + " + ", ".join(sorted(chosen - set(DEFAULT)))] = score(readings, chosen)
    rounded = {
        k: {
            s: (round(v, 2) if isinstance(v, float) else v)
            if not isinstance(v, dict)
            else {a: round(b, 2) if isinstance(b, float) else b for a, b in v.items()}
            for s, v in r.items()
        }
        for k, r in rows.items()
    }
    args.json.write_text(json.dumps({"weights": args.weights, "note": __doc__.split("\n\n")[2].replace("\n", " "), "results": rounded}, indent=1) + "\n")
    for k, r in rounded.items():
        print(
            f"{k:45s} mean even {r['mean/0']:6.2f} odd {r['mean/1']:6.2f} all {r['mean/all']:6.2f}  right {r['right/0']}/{r['right/1']}  svt {r['svt']['all']:6.2f}"
        )


if __name__ == "__main__":
    main()
