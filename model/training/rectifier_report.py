"""What a checkpoint's TPS rectifier does: a picture and the numbers behind it.

    python -m model.training.rectifier_report weights/safl.safetensors runs/mine/last.safetensors \\
        --png docs/results/rectifier.png --json docs/results/rectifier.json

Words are rendered in the held-out font families (``fonts.HELD_OUT_FAMILIES``), dark on
light, cropped at the ink, three ways: straight, under a perspective warp and bent along an
arc (the synthetic renderer's own ``_perspective`` and ``_curve``). For each checkpoint and
kind the report gives, over the crops, in normalised image units (the image spans -1..1):

- ``offset``: mean distance of the predicted fiducial points from the identity's;
- ``spread``: standard deviation of each point across crops, averaged over points (a
  rectifier that applies one fixed warp to everything has a spread near 0);
- ``bend_response``: mean distance between a word's points when curved and when straight
  (how much the rectifier reacts to curvature; 0 = not at all);
- ``outside``: share of output columns of the middle row that sample outside the image.

The PNG shows, per kind, a few inputs and each checkpoint's rectified output (what its
encoder reads). Needs matplotlib (the ``train`` extra).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..charset import DEFAULT_CHARS
from ..checkpoint import load_checkpoint
from ..preprocess import resize, to_pixels, to_tensor
from ..rectify import fiducial_points
from .fonts import by_family, discover_fonts
from .synth import Renderer
from .words import Lexicon

KINDS = ("straight", "perspective", "curved")


def render_words(n: int, seed: int = 7) -> dict[str, list[Image.Image]]:
    """``n`` words per kind (the same words and fonts in each kind), grey, cropped at the ink.

    Raises ``RuntimeError`` when no font is installed.
    """
    families = by_family(discover_fonts(DEFAULT_CHARS, families="held_out")) or by_family(discover_fonts(DEFAULT_CHARS, families="all"))
    if not families:
        raise RuntimeError("no fonts installed: apt-get install fonts-dejavu fonts-liberation2")
    rng = random.Random(seed)
    lexicon = Lexicon()
    out: dict[str, list[Image.Image]] = {k: [] for k in KINDS}
    for _ in range(n):
        word = lexicon.uniform(rng)
        word = word.capitalize() if rng.random() < 0.5 else word.upper()
        face = rng.choice(rng.choice(families))
        font = ImageFont.truetype(face.path, 48)
        left, t, r, b = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), word, font=font)
        pad = 12
        img = Image.new("L", (r - left + 2 * pad, b - t + 2 * pad), 255)
        ImageDraw.Draw(img).text((pad - left, pad - t), word, font=font, fill=0)
        ink = Image.eval(img, lambda v: 255 - v).getbbox()
        straight = img.crop(ink)
        out["straight"].append(straight)
        out["perspective"].append(Renderer._perspective(straight, 255, random.Random(rng.random())))
        amp = int(straight.height * rng.uniform(0.35, 0.6))
        tall = Image.new("L", (straight.width, straight.height + 2 * amp), 255)
        tall.paste(straight, (0, amp))
        curved = Renderer._curve(tall, amp, random.Random(rng.random()))
        out["curved"].append(curved.crop(Image.eval(curved, lambda v: 255 - v).getbbox()))
    return out


def analyse(weights: Path, crops: dict[str, list[Image.Image]]) -> tuple[dict, dict[str, np.ndarray]]:
    """The numbers of one checkpoint per kind, and its rectified outputs (uint8 ``[N, H, W]``)."""
    model, info = load_checkpoint(weights)
    if model.rectifier is None:
        raise ValueError(f"{weights} has no rectifier (use_tps=False)")
    cfg = info.config.preprocess
    base = fiducial_points(info.config.tps_points)
    numbers, outputs, points = {}, {}, {}
    with torch.no_grad():
        for kind, imgs in crops.items():
            x = torch.stack([to_tensor(resize(im, cfg)) for im in imgs])
            p = model.rectifier.points(x)
            points[kind] = p
            grid = model.rectifier.grid(p)
            mid = grid[:, grid.shape[1] // 2]
            numbers[kind] = {
                "offset": float((p - base).norm(dim=-1).mean()),
                "spread": float(p.std(dim=0).norm(dim=-1).mean()),
                "outside": float((mid.abs() > 1).any(dim=-1).float().mean()),
            }
            outputs[kind] = to_pixels(model.rectifier(x))
        numbers["curved"]["bend_response"] = float((points["curved"] - points["straight"]).norm(dim=-1).mean())
    return {"model": info.model_id, "kinds": numbers}, outputs


def picture(crops: dict[str, list[Image.Image]], names: list[str], outputs: list[dict[str, np.ndarray]], path: Path, show: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 1 + len(names)
    rows = len(KINDS) * show
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 0.75 * rows), squeeze=False)
    for k, kind in enumerate(KINDS):
        for i in range(show):
            r = k * show + i
            panels = [np.asarray(crops[kind][i].resize((128, 32)))] + [o[kind][i] for o in outputs]
            for c, img in enumerate(panels):
                ax = axes[r][c]
                ax.imshow(img, cmap="gray", vmin=0, vmax=255)
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title("input (as the model gets it)" if c == 0 else names[c - 1], fontsize=8)
                if c == 0 and i == 0:
                    ax.set_ylabel(kind, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", type=Path, nargs="+", help="checkpoints to compare")
    p.add_argument("--names", nargs="+", help="a short name per checkpoint (default: its model id)")
    p.add_argument("--n", type=int, default=200, help="words per kind (default: 200)")
    p.add_argument("--png", type=Path)
    p.add_argument("--json", type=Path)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.names and len(args.names) != len(args.weights):
        p.error("give one --names entry per checkpoint")
    torch.set_num_threads(args.threads)
    crops = render_words(args.n)
    reports, outputs = [], []
    for w in args.weights:
        rep, out = analyse(w, crops)
        reports.append(rep)
        outputs.append(out)
    names = args.names or [r["model"] for r in reports]
    print("| model | kind | offset | spread | outside (middle row) | bend response |\n|---|---|---:|---:|---:|---:|")
    for name, rep in zip(names, reports):
        for kind, v in rep["kinds"].items():
            bend = f"{v['bend_response']:.3f}" if "bend_response" in v else ""
            print(f"| {name} | {kind} | {v['offset']:.3f} | {v['spread']:.3f} | {100 * v['outside']:.1f} % | {bend} |")
    if args.json:
        args.json.write_text(json.dumps({"n_per_kind": args.n, "models": dict(zip(names, reports))}, indent=1) + "\n")
    if args.png:
        picture(crops, names, outputs, args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
