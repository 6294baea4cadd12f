"""Plots of the benchmarks: accuracy and speed of safl vs its peers (``bench/peers.py --json``)
and, when given, the service's latency percentiles vs offered load (``bench/service_load.py --json``)::

    python bench/peer_plots.py --peers docs/results/peers.json --service-load docs/results/load.json --out docs/results/peers.png

``bench/peers.py --plot PNG [--service-load JSON]`` draws the same figure at the end of its run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

PEER_ORDER = ("safl", "tesseract", "rapidocr")
COLORS = {"safl": "tab:blue", "tesseract": "tab:orange", "rapidocr": "tab:green"}
PERCENTILES = (("p50_ms", "p50", "-"), ("p95_ms", "p95", "--"), ("p99_ms", "p99", ":"))


def _peer_label(name: str, s: dict[str, Any]) -> str:
    return name + (f" ({s['config']})" if s.get("config", "default") != "default" else "")


def plot_accuracy(report: dict[str, Any], ax: Any) -> None:
    """Grouped bars: 36-char accuracy per dataset (and overall), one bar per peer."""
    summ = report["summary"]
    peers = [p for p in PEER_ORDER if p in summ] + [p for p in summ if p not in PEER_ORDER]
    names = [d["name"] for d in report["datasets"]]
    keys = names + (["all"] if len(names) > 1 else [])
    width = 0.8 / max(len(peers), 1)
    for i, p in enumerate(peers):
        b1 = summ[p]["batch1"]
        vals = [100 * (b1["all"]["acc36"] if k == "all" else b1["datasets"][k]["acc36"]) for k in keys]
        xs = [j + (i - (len(peers) - 1) / 2) * width for j in range(len(keys))]
        bars = ax.bar(xs, vals, width, label=_peer_label(p, summ[p]), color=COLORS.get(p))
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks(range(len(keys)), [f"{k}\n(n={_n(report, k)})" for k in keys])
    ax.set_ylabel("word accuracy, 36-char protocol (%)")
    ax.set_ylim(0, 118)
    ax.set_yticks(range(0, 101, 20))
    ax.set_title(f"Accuracy per dataset ({report.get('part', '?')} part)")
    ax.legend(fontsize=8, loc="upper center", ncol=len(peers), frameon=False)
    ax.grid(axis="y", alpha=0.3)


def _n(report: dict[str, Any], key: str) -> int:
    ds = {d["name"]: d.get("n36", d.get("crops", 0)) for d in report["datasets"]}
    return sum(ds.values()) if key == "all" else ds[key]


def plot_speed(report: dict[str, Any], ax: Any) -> None:
    """crops/s over all datasets against batch size, one line per peer (tesseract: one point)."""
    variants = report["variants"]
    summ = report["summary"]
    for p in [p for p in PEER_ORDER if p in variants] + [p for p in variants if p not in PEER_ORDER]:
        chosen = summ[p]["config"]
        pts = sorted((v["batch_size"], v["all"]["crops_per_s"]) for v in variants[p] if v["config"] == chosen)
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", label=_peer_label(p, summ[p]), color=COLORS.get(p))
        ax.annotate(f"{ys[-1]:.0f}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(4, 2), fontsize=7)
    sizes = sorted({v["batch_size"] for vs in variants.values() for v in vs})
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(ticker.ScalarFormatter())
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xlabel("crops per call (batch size)")
    ax.set_ylabel("crops/s (end to end from image bytes)")
    ax.set_title(f"Speed, {report.get('threads', '?')} threads each")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")


def plot_latency(load: dict[str, Any], ax: Any) -> None:
    """Latency percentiles against concurrency (closed-loop clients = offered load), one colour per server setup."""
    rows = load.get("results", load if isinstance(load, list) else [])
    labels = list(dict.fromkeys(r.get("label", "service") for r in rows))
    cmap = plt.get_cmap("tab10")
    for i, label in enumerate(labels):
        pts = sorted((r for r in rows if r.get("label", "service") == label), key=lambda r: r["concurrency"])
        for key, name, style in PERCENTILES:
            if not all(key in r for r in pts):
                continue
            ax.plot([r["concurrency"] for r in pts], [r[key] for r in pts], style, marker="o", markersize=3, color=cmap(i % 10), label=f"{label} {name}")
    levels = sorted({r["concurrency"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ticker.ScalarFormatter())
    ax.set_xlabel("offered load: concurrent clients (closed loop)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Service latency vs load")
    ax.legend(fontsize=7, ncol=max(1, len(labels) // 3))
    ax.grid(alpha=0.3, which="both")


def make_figure(report: dict[str, Any] | None, load: dict[str, Any] | None, out: Path) -> Path:
    """One PNG: accuracy and speed panels from ``report``, a latency panel from ``load``."""
    panels = ([plot_accuracy, plot_speed] if report else []) + ([plot_latency] if load else [])
    if not panels:
        raise ValueError("nothing to plot: give a peers report, a service-load result or both")
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.8), squeeze=False)
    for ax, fn in zip(axes[0], panels):
        fn(load if fn is plot_latency else report, ax)
    if report:
        fig.suptitle(report.get("machine", {}).get("summary", ""), fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Plot bench/peers.py and bench/service_load.py results")
    p.add_argument("--peers", type=Path, help="JSON written by bench/peers.py --json")
    p.add_argument("--service-load", type=Path, help="JSON written by bench/service_load.py --json")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = p.parse_args(argv)
    if not args.peers and not args.service_load:
        p.error("give --peers, --service-load or both")
    report = json.loads(args.peers.read_text()) if args.peers else None
    load = json.loads(args.service_load.read_text()) if args.service_load else None
    print(make_figure(report, load, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
