"""What a checkpoint's TPS rectifier does: a picture and the numbers behind it.

    python -m model.training.rectifier_report weights/safl.safetensors runs/mine/last.safetensors \\
        --real ../shared/data/train/iiit5k ../shared/data/train/svt \\
        --png docs/results/rectifier.png --json docs/results/rectifier.json

Crops are rendered by the training renderer (``synth.Renderer``) in the held-out font
families (``fonts.HELD_OUT_FAMILIES``), with nothing that blurs or hides the ink, four ways:
straight, under a perspective warp, bent along a parabola (``curved``) and set along a
circular arc (``arc``); the same words in each kind. For each checkpoint and kind the report
gives, over the crops, in normalised image units (the image spans -1..1):

- ``offset``: mean distance of the predicted fiducial points from the identity's;
- ``spread``: standard deviation of each point across crops, averaged over points (a
  rectifier that applies one fixed warp to everything has a spread near 0);
- ``edge_bend``: how far each predicted edge bows away from the straight line through its end
  points (mean absolute y distance of its points from that chord); a tilt or a perspective
  does not count, a curve does, so it should be near 0 on straight text and clearly above it
  on curved text (``truth_bend``: the same of the renderer's own edges);
- ``point_error``: mean distance of the predicted points from what the rectifier is taught
  to predict (``model.rectify.point_targets`` of the renderer's own geometry);
- ``bend_response`` (curved and arc): mean distance between a word's points when bent and
  when straight (how much the rectifier reacts to curvature; 0 = not at all);
- ``outside``: share of output columns of the middle row that sample outside the image.

The PNG shows, per kind, a few inputs and each checkpoint's rectified output (what its
encoder reads), and with ``--real`` a few real validation crops too. Needs matplotlib (the
``train`` extra).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from ..charset import DEFAULT_CHARS
from ..checkpoint import load_checkpoint
from ..preprocess import to_pixels, to_tensor
from ..rectify import fiducial_points, point_targets
from .fonts import discover_fonts
from .synth import PLAIN, Renderer

KINDS = ("straight", "perspective", "curved", "arc")
#: What each kind turns on (``synth.PLAIN``: everything that blurs, hides or frames the ink is off).
_PLAIN = dataclasses.replace(PLAIN, seed=7)
_KIND_FLAGS = {"straight": {}, "perspective": {"p_perspective": 1.0}, "curved": {"p_curve": 1.0}, "arc": {"p_arc": 1.0}}


@dataclasses.dataclass
class Crops:
    """Rendered crops of one kind: uint8 ``[N, 32, 128]`` images and float32 ``[N, F, 2]``
    fiducial points (the renderer's geometry; NaN rows where an edge folds)."""

    images: np.ndarray
    points: np.ndarray


def render_words(n: int, seed: int = 7) -> dict[str, Crops]:
    """``n`` crops per kind, the same words, fonts and margins in each kind.

    Raises ``RuntimeError`` when no font is installed.
    """
    faces = discover_fonts(DEFAULT_CHARS, families="held_out") or discover_fonts(DEFAULT_CHARS, families="all")
    if not faces:
        raise RuntimeError("no fonts installed: apt-get install fonts-dejavu fonts-liberation2")
    out = {}
    for kind in KINDS:
        renderer = Renderer(dataclasses.replace(_PLAIN, seed=seed, **_KIND_FLAGS[kind]), faces)
        rendered = [renderer.render_with_points(i) for i in range(n)]
        out[kind] = Crops(np.stack([r[0] for r in rendered]), np.stack([r[2] for r in rendered]))
    return out


def edge_bend(points: torch.Tensor) -> float:
    """Mean absolute distance (normalised y) of each edge's points from the chord through its
    two ends, over the edges of ``points`` ``[N, F, 2]`` (top edge, then bottom edge)."""
    k = points.shape[1] // 2
    edges = points.reshape(-1, 2, k, 2)
    x, y = edges[..., 0], edges[..., 1]
    t = (x - x[..., :1]) / (x[..., -1:] - x[..., :1]).clamp(min=1e-6)
    chord = y[..., :1] + t * (y[..., -1:] - y[..., :1])
    return float((y - chord).abs().mean())


def analyse(weights: Path, crops: dict[str, Crops], real: np.ndarray | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """The numbers of one checkpoint per kind, and its rectified outputs (uint8 ``[N, H, W]``
    per kind, and ``"real"`` for ``real`` crops, uint8 ``[M, H, W]``)."""
    model, info = load_checkpoint(weights)
    if model.rectifier is None:
        raise ValueError(f"{weights} has no rectifier (use_tps=False)")
    cfg = info.config
    base = fiducial_points(cfg.tps_points)
    numbers, outputs, points = {}, {}, {}
    with torch.no_grad():
        for kind, c in crops.items():
            x = to_tensor(c.images)
            p = model.rectifier.points(x)
            points[kind] = p
            grid = model.rectifier.grid(p)
            mid = grid[:, grid.shape[1] // 2]
            target = point_targets(torch.from_numpy(c.points), cfg.tps_max_offset, cfg.width / cfg.height)
            known = ~torch.isnan(target).flatten(1).any(dim=1)
            numbers[kind] = {
                "offset": float((p - base).norm(dim=-1).mean()),
                "spread": float(p.std(dim=0).norm(dim=-1).mean()),
                "edge_bend": edge_bend(p),
                "truth_bend": edge_bend(torch.from_numpy(c.points)[known]),
                "point_error": float((p[known] - target[known]).norm(dim=-1).mean()),
                "outside": float((mid.abs() > 1).any(dim=-1).float().mean()),
            }
            outputs[kind] = to_pixels(model.rectifier(x))
        for kind in ("curved", "arc"):
            numbers[kind]["bend_response"] = float((points[kind] - points["straight"]).norm(dim=-1).mean())
        if real is not None and len(real):
            outputs["real"] = to_pixels(model.rectifier(to_tensor(real)))
    return {"model": info.model_id, "kinds": numbers}, outputs


def picture(crops: dict[str, Crops], names: list[str], outputs: list[dict[str, np.ndarray]], path: Path, show: int = 4, real: np.ndarray | None = None) -> None:
    """Rows of inputs and each checkpoint's rectified output: ``show`` per kind, then the real crops."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(kind, crops[kind].images[:show], [o[kind][:show] for o in outputs]) for kind in KINDS]
    if real is not None and len(real):
        groups.append(("real", real, [o["real"] for o in outputs]))
    cols = 1 + len(names)
    rows = sum(len(g[1]) for g in groups)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 0.75 * rows), squeeze=False)
    r = 0
    for kind, inputs, rectified in groups:
        for i in range(len(inputs)):
            for c, img in enumerate([inputs[i]] + [o[i] for o in rectified]):
                ax = axes[r][c]
                ax.imshow(img, cmap="gray", vmin=0, vmax=255)
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title("input (as the model gets it)" if c == 0 else names[c - 1], fontsize=8)
                if c == 0 and i == 0:
                    ax.set_ylabel(kind, fontsize=8)
            r += 1
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def real_crops(folders: list[Path], n: int, seed: int = 0) -> np.ndarray:
    """``n`` crops drawn from the validation parts of labelled ``folders`` (uint8 ``[n, 32, 128]``)."""
    from ..preprocess import PreprocessConfig
    from .data import load_folder_part
    from .split import DEFAULT_SPLIT

    images = np.concatenate([load_folder_part(f, PreprocessConfig(), "val", DEFAULT_SPLIT, view_cfg=None).images for f in folders])
    pick = np.random.default_rng(seed).choice(len(images), size=min(n, len(images)), replace=False)
    return images[np.sort(pick)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", type=Path, nargs="+", help="checkpoints to compare")
    p.add_argument("--names", nargs="+", help="a short name per checkpoint (default: its model id)")
    p.add_argument("--n", type=int, default=200, help="crops per kind (default: 200)")
    p.add_argument("--real", type=Path, nargs="+", metavar="DIR", help="labels.tsv folders: a few crops of their validation part join the picture")
    p.add_argument("--png", type=Path)
    p.add_argument("--json", type=Path)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.names and len(args.names) != len(args.weights):
        p.error("give one --names entry per checkpoint")
    torch.set_num_threads(args.threads)
    crops = render_words(args.n)
    real = real_crops(args.real, 8) if args.real else None
    reports, outputs = [], []
    for w in args.weights:
        rep, out = analyse(w, crops, real)
        reports.append(rep)
        outputs.append(out)
    names = args.names or [r["model"] for r in reports]
    print(
        "| model | kind | offset | spread | edge bend (truth) | point error | outside (middle row) | bend response |\n|---|---|---:|---:|---:|---:|---:|---:|"
    )
    for name, rep in zip(names, reports):
        for kind, v in rep["kinds"].items():
            bend = f"{v['bend_response']:.3f}" if "bend_response" in v else ""
            print(
                f"| {name} | {kind} | {v['offset']:.3f} | {v['spread']:.3f} | {v['edge_bend']:.3f} ({v['truth_bend']:.3f}) | {v['point_error']:.3f} "
                f"| {100 * v['outside']:.1f} % | {bend} |"
            )
    if args.json:
        args.json.write_text(json.dumps({"n_per_kind": args.n, "models": dict(zip(names, reports))}, indent=1) + "\n")
    if args.png:
        picture(crops, names, outputs, args.png, real=real)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
