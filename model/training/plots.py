"""Plots and tables of the training campaign (``docs/results/``): training curves, focal vs
cross entropy, the label-frequency skew that motivates the focal loss, and the pooled
validation of continuations from one checkpoint (whether more CPU training still moves it).

    python -m model.training.plots --runs runs/small-focal-s0 runs/small-ce-s0 --synth data/synth --out docs/results
    python -m model.training.plots --plateau runs/r7-long runs/r9-arcs --line "shipped 112a46b67e37=78.36" --out docs/results
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .config import TrainConfig  # noqa: E402
from .resume import read_saved  # noqa: E402


def read_log(run: Path, chain: bool = True) -> tuple[list[dict], list[dict]]:
    """(train records, validation records) of a run's ``log.jsonl``; a resumed run's
    repeated steps keep the last record written.

    A run started with ``--init`` from another run's checkpoint is chained to that run:
    its records come after the parent's records up to the checkpoint's step, with steps
    and images counted from the parent's start.
    """
    train: dict[int, dict] = {}
    val: dict[int, dict] = {}
    offset, images_offset = chain_offset(run) if chain else (0, 0)
    parent = parent_run(run) if chain else None
    if parent is not None:
        ptrain, pval = read_log(parent[0])
        train.update({r["step"]: r for r in ptrain if r["step"] <= offset})
        val.update({r["step"]: r for r in pval if r["step"] <= offset})
    for line in (run / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rec = {**rec, "step": rec["step"] + offset, "images": rec.get("images", 0) + images_offset}
        (val if "val" in rec else train)[rec["step"]] = rec
    return [train[k] for k in sorted(train)], [val[k] for k in sorted(val)]


def chain_offset(run: Path) -> tuple[int, int]:
    """(steps, images) seen before this run started, summed over its chain of parents."""
    parent = parent_run(run)
    if parent is None:
        return 0, 0
    parent_dir, step, images = parent
    before_steps, before_images = chain_offset(parent_dir)
    return before_steps + step, before_images + images


def parent_run(run: Path) -> tuple[Path, int, int] | None:
    """(parent run folder, step, images seen) of the checkpoint a run was started from, if logged."""
    init = (read_saved(run) or {}).get("init")
    if not init or not Path(init).with_suffix(".json").is_file():
        return None
    meta = json.loads(Path(init).with_suffix(".json").read_text()).get("training", {})
    parent = Path(init).parent
    if not (parent / "log.jsonl").is_file() or "step" not in meta:
        return None
    offset = int(meta["step"])
    images = int(meta.get("images_seen", offset * (read_saved(parent) or {}).get("batch_size", 64)))
    return parent, offset, images


def _label(run: Path) -> str:
    cfg = read_saved(run) or asdict(TrainConfig())  # a folder without its config: the defaults
    return f"{run.name} ({'focal γ=' + str(cfg['gamma']) if cfg['loss'] == 'focal' else 'CE'})"


def _save(fig: plt.Figure, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_curves(runs: list[Path], out: Path) -> Path:
    """Loss and validation accuracy (36-char, per set and mean) against images seen."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(13, 4.5))
    for run in runs:
        train, val = read_log(run)
        if train:
            ax_loss.plot([r["images"] / 1e6 for r in train], [r["loss"] for r in train], label=_label(run), lw=1)
        if val:
            x = [r["images"] / 1e6 for r in val]
            line = ax_acc.plot(x, [100 * r["val"]["mean_acc36"] for r in val], lw=2, label=f"{_label(run)} mean")[0]
            sets = [k for k in val[-1]["val"] if isinstance(val[-1]["val"][k], dict)]
            for style, name in zip((":", "--", "-."), sets):
                ax_acc.plot(x, [100 * r["val"].get(name, {}).get("acc36", float("nan")) for r in val], style, color=line.get_color(), lw=1, label=f"  {name}")
    starts: dict[int, str] = {}
    for run in runs:
        r = run
        while parent_run(r) is not None:  # mark where each run of the chain took over
            starts.setdefault(chain_offset(r)[1], r.name)
            r = parent_run(r)[0]
    for x, name in sorted(starts.items()):
        for ax in (ax_loss, ax_acc):
            ax.axvline(x / 1e6, color="grey", ls=":", lw=1)
        ax_acc.annotate(f" {name}", (x / 1e6, 1), color="grey", fontsize=7, rotation=90, va="bottom")
    ax_loss.set(xlabel="images seen (millions)", ylabel="training loss (focal and CE are different scales)", title="Training loss", yscale="log")
    ax_acc.set(xlabel="images seen (millions)", ylabel="word accuracy, 36-char (%)", title="Validation accuracy (real crops never trained on)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out)


def plot_continuations(runs: list[Path], metrics: Path, out: Path, since_step: dict[str, int] | None = None) -> Path:
    """Mean validation accuracy of runs that continued from the shipped checkpoint, against
    the images each trained, with the shipped model's own mean (``weights/metrics.json``)
    as the line to beat: whether more CPU training moves the model.

    ``since_step`` drops a run's validations before a step (e.g. ones read another way).
    """
    shipped = json.loads(metrics.read_text())
    baseline = 100 * sum(d["acc36"] for d in shipped["datasets"]) / len(shipped["datasets"])
    series = {}
    for run in runs:
        _, val = read_log(run)
        series[run.name] = [(r["images"], 100 * r["val"]["mean_acc36"]) for r in val if r["step"] >= (since_step or {}).get(run.name, 0)]
    return _accuracy_plot(
        series,
        {f"shipped {shipped['model']}": baseline},
        out,
        xlabel="images trained since the shipped checkpoint (thousands)",
        ylabel="mean word accuracy, 36-char (%)",
        title="CPU continuations of the shipped model (validation, default views)",
    )


def _accuracy_plot(series: dict[str, list[tuple[int, float]]], lines: dict[str, float], out: Path, **labels: str) -> Path:
    """Accuracy (%) against images trained, one line of points per run, and dashed
    horizontal reference lines; ``labels`` are ``xlabel``, ``ylabel`` and ``title``."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, points in series.items():
        if points:
            ax.plot([i / 1e3 for i, _ in points], [a for _, a in points], "o-", lw=1.5, label=name)
    for k, (label, value) in enumerate(lines.items()):
        ax.axhline(value, color=f"C{len(series) + k}", ls="--", lw=1, label=f"{label}: {value:.2f} %")
    ax.set(**labels)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)


def pooled_curve(run: Path) -> list[tuple[int, float]]:
    """(images trained, pooled validation accuracy in %) at each validation of a run, step 0
    (the ``--init`` weights' own validation) included: crops read right over all crops of
    every set the run validates on (its ``val`` part), 36-char; ``ship`` pools the same way
    on ``val-unseen``. Only the run's own log: a run started from another run's checkpoint
    is not chained to it here, so step 0 is where this run began."""
    _, val = read_log(run, chain=False)
    curve = []
    for rec in val:
        sets = [v for v in rec["val"].values() if isinstance(v, dict)]
        right = sum(round(v["acc36"] * v["n"]) for v in sets)  # exact: acc36 is logged to 4 decimals, n < 10,000
        curve.append((int(rec["images"]), 100 * right / sum(v["n"] for v in sets)))
    return curve


def plot_plateau(runs: list[Path], out: Path, lines: dict[str, float] | None = None) -> Path:
    """Pooled validation accuracy of runs continued from a checkpoint against the images each
    trained (``pooled_curve``), with reference models as horizontal lines (``lines``: label →
    pooled %): whether more CPU training moves the model or each run returns to where it began."""
    return _accuracy_plot(
        {run.name: pooled_curve(run) for run in runs},
        lines or {},
        out,
        xlabel="images trained since the run's start (thousands)",
        ylabel="pooled word accuracy, 36-char (%)",
        title="Continuations on CPU (validation part, default views; step 0 = the start checkpoint)",
    )


def focal_vs_ce_table(focal: Path, ce: Path) -> str:
    """Markdown table of validation accuracy at every step both runs were validated."""
    _, vf = read_log(focal)
    _, vc = read_log(ce)
    by_step = {r["step"]: r for r in vc}
    rows = ["| step | images | set | focal γ=2 | CE | focal − CE |", "|---:|---:|---|---:|---:|---:|"]
    for r in vf:
        other = by_step.get(r["step"])
        if other is None:
            continue
        for name, m in r["val"].items():
            if not isinstance(m, dict):
                continue
            o = other["val"][name]["acc36"]
            rows.append(f"| {r['step']} | {r['images']} | {name} (n={m['n']}) | {100 * m['acc36']:.2f} | {100 * o:.2f} | {100 * (m['acc36'] - o):+.2f} |")
    return "\n".join(rows) + "\n"


def validation_table(run: Path) -> str:
    """Markdown: every validation of a run (chained to its parent): step, images, hours, accuracies."""
    _, val = read_log(run)
    if not val:
        return f"{run.name}: no validation yet\n"
    sets = [k for k in val[-1]["val"] if isinstance(val[-1]["val"][k], dict)]
    lines = ["| step | images | train h (this run) | " + " | ".join(sets) + " | mean |", "|---:|---:|---:|" + "---:|" * (len(sets) + 1)]
    for r in val:
        accs = " | ".join(f"{100 * r['val'].get(k, {}).get('acc36', float('nan')):.2f}" for k in sets)
        lines.append(f"| {r['step']} | {r['images']:,} | {r.get('train_hours', 0):.2f} | {accs} | {100 * r['val']['mean_acc36']:.2f} |")
    return "\n".join(lines) + "\n"


def plot_label_skew(label_files: list[Path], out: Path, real_tsvs: list[Path] = ()) -> Path:
    """Word rank/frequency (log-log) and character frequency of the training labels."""
    words: Counter[str] = Counter()
    for f in label_files:
        words.update(f.read_text(encoding="utf-8").splitlines())
    real: Counter[str] = Counter()
    for tsv in real_tsvs:
        real.update(line.partition("\t")[2] for line in tsv.read_text(encoding="utf-8").splitlines() if line)
    chars: Counter[str] = Counter()
    for w, n in words.items():
        for c in w:
            chars[c] += n
    fig, (ax_w, ax_c) = plt.subplots(1, 2, figsize=(14, 4.5))
    ranked = sorted(words.values(), reverse=True)
    ax_w.loglog(range(1, len(ranked) + 1), ranked, label=f"synthetic labels ({sum(ranked):,} crops, {len(ranked):,} distinct)")
    if real:
        rr = sorted(real.values(), reverse=True)
        ax_w.loglog(range(1, len(rr) + 1), rr, label=f"real train labels ({sum(rr):,} crops)")
    ax_w.set(xlabel="word rank", ylabel="count", title="Word frequency (Zipf-like skew)")
    ax_w.legend(fontsize=8)
    ax_w.grid(alpha=0.3)
    top = chars.most_common()
    ax_c.bar(range(len(top)), [n for _, n in top], color="tab:orange")
    ax_c.set_xticks(range(len(top)))
    ax_c.set_xticklabels([c for c, _ in top], fontsize=5)
    ax_c.set_yscale("log")
    ax_c.set(title="Character frequency in synthetic labels", ylabel="count")
    return _save(fig, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, nargs="+", default=[], help="run folders; with two (focal, ce) also the comparison")
    p.add_argument("--synth", type=Path, help="shard folder whose labels to plot")
    p.add_argument("--real", type=Path, nargs="*", default=[], help="labels.tsv folders to compare the skew with")
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    p.add_argument("--continuations", type=Path, nargs="*", default=[], help="runs continued from the shipped checkpoint: docs/results/cpu_continuations.png")
    p.add_argument("--metrics", type=Path, default=Path("weights/metrics.json"), help="the shipped model's validation (the line to beat)")
    p.add_argument("--since", nargs="*", default=[], metavar="RUN=STEP", help="drop a continuation's validations before STEP")
    p.add_argument(
        "--plateau", type=Path, nargs="*", default=[], help="runs whose pooled validation to plot from step 0: docs/results/continuation_plateau.png"
    )
    p.add_argument("--line", nargs="*", default=[], metavar="LABEL=PERCENT", help="with --plateau: a reference model's pooled validation accuracy")
    p.add_argument("--plateau-png", default="continuation_plateau.png", help="with --plateau: the file name in --out (default: %(default)s)")
    args = p.parse_args(argv)
    if not args.runs and not args.continuations and not args.plateau:
        p.error("give --runs, --continuations and/or --plateau")
    if args.line and not args.plateau:
        p.error("--line draws on the --plateau plot; give --plateau RUN...")
    try:
        lines = {k: float(v) for k, v in (item.rsplit("=", 1) for item in args.line)}
    except ValueError:
        p.error("--line takes LABEL=PERCENT, e.g. 'shipped 112a46b67e37=78.36'")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.continuations:
        since = {k: int(v) for k, v in (item.split("=", 1) for item in args.since)}
        print(plot_continuations(args.continuations, args.metrics, args.out / "cpu_continuations.png", since))
    if args.plateau:
        print(plot_plateau(args.plateau, args.out / args.plateau_png, lines))
    if not args.runs:
        return 0
    print(plot_curves(args.runs[:1], args.out / "training_curves.png"))
    (args.out / "validation_log.md").write_text("".join(f"### {_label(r)}\n\n{validation_table(r)}\n" for r in args.runs))
    if len(args.runs) == 2:
        (args.out / "focal_vs_ce.md").write_text(focal_vs_ce_table(*args.runs))
        print(plot_curves(args.runs, args.out / "focal_vs_ce.png"))
    if args.synth:
        print(plot_label_skew(sorted(args.synth.glob("shard-*.txt")), args.out / "label_distribution.png", [d / "labels.tsv" for d in args.real]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
