"""The reliability diagram of a confidence (Guo et al., ICML 2017, figure 1): per bin of
confidence, the share of readings right against the bin's mean confidence, with the
number of readings per bin below."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..calibration import Reliability  # noqa: E402


def plot_reliability(rel: Reliability | Sequence[tuple[str, Reliability]], out: Path, title: str = "") -> Path:
    """Draw ``rel`` (one ``Reliability`` or several labelled ones, e.g. before and after
    calibration) as a PNG at ``out``; returns ``out``."""
    series = [("", rel)] if isinstance(rel, Reliability) else list(rel)
    bins = len(series[0][1].counts)
    edges = [i / bins for i in range(bins + 1)]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.2, 6.0), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfectly calibrated")
    width = 1.0 / bins / len(series)
    for k, (label, r) in enumerate(series):
        xs = [edges[i] + (k + 0.5) * width for i in range(bins)]
        acc = [0.0 if math.isnan(a) else a for a in r.accuracy]
        name = f"{label}: ECE {r.ece:.3f}" if label else f"ECE {r.ece:.3f}"
        top.bar(xs, acc, width=width * 0.95, alpha=0.75, label=name)
        top.plot(
            [c for c in r.confidence if not math.isnan(c)], [a for c, a in zip(r.confidence, r.accuracy) if not math.isnan(c)], "o", color="black", markersize=3
        )
        bottom.bar(xs, r.counts, width=width * 0.95, alpha=0.75)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("share right (exact, case-sensitive)")
    top.legend(loc="upper left", fontsize=8)
    if title:
        top.set_title(title, fontsize=9)
    bottom.set_xlabel("confidence (dots: each bin's mean)")
    bottom.set_ylabel("readings")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
