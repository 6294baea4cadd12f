"""Clean-text benchmark: printed words in fonts the model never trained on, cropped the way a
text detector crops them, read by safl and the RapidOCR packages side by side in one run::

    python bench/clean_text.py --weights weights/safl.safetensors --json docs/results/clean_text.json

What is read. Texts of 1-25 characters in four length buckets (1-4, 5-8, 9-12, 13-25), drawn
by the synthetic renderer's text sampler with a seed training never uses: English words in
every case, numbers, prices, dates, codes with punctuation, and for the long bucket URLs,
e-mail addresses, phone numbers and compounds. Each is rendered black on white or (every
other text) white on black, in one of the ``model.training.fonts.HELD_OUT_FAMILIES`` (the
renderer never trains on them), and cropped at the ink with a margin of 0, 5, 15 and 40 %
of the ink height on every side: one crop per text and margin, so the margins compare the
same texts.

``--colour``: the same texts, each in a colour pair of weak luma and strong chroma instead
(``model.training.colours.weak_luma_pair``: text and background within 24 luma levels of
each other and clearly different hues, e.g. yellow on yellowish, red on dark red, pink on
white), drawn from a random stream of their own: the crops a grey reader hardly sees, to
compare a grey model with one grown to read colour (``grow --channels 3``) on the same texts::

    python bench/clean_text.py --colour --weights runs/rgb/best.safetensors --json docs/results/clean_text_colour.json

``--phrases``: short phrases instead of words (the renderer's ``phrase`` kind: a label and its
value, a name, "Exit 12", a run of words; 2-3 words up to 25 characters), scored with their
spaces (one between words, none at either end): the benchmark of a model whose charset holds
the space (issue 31, lever 3); a word reader, which drops every space, reads none of them right.

Metric: exact, case-sensitive word accuracy (whitespace removed on both sides; kept with
``--phrases``), per margin
and per length bucket; targets (issue "Accuracy"): >= 97 % at every margin and >= 95 % for
13-25 characters. Engines: ``bench/peers.py``'s ``safl`` (the service's code path and default
views), ``rapidocr`` (rapidocr-onnxruntime 1.x, PP-OCRv4) and ``rapidocr3`` (rapidocr 3.x,
PP-OCRv6 small), one crop per call; a peer that is not installed is skipped with a message.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.peers import DEFAULT_WEIGHTS, Folder, PeerUnavailable, build_peers, run_benchmark  # noqa: E402
from model.charset import DEFAULT_CHARS  # noqa: E402
from model.checkpoint import CheckpointError  # noqa: E402
from model.training.colours import RGB, weak_luma_pair  # noqa: E402
from model.training.fonts import FontFace, by_family, discover_fonts  # noqa: E402
from model.training.words import Lexicon, TextMix, TextSampler  # noqa: E402

MARGINS = (0.0, 0.05, 0.15, 0.4)
BUCKETS = ((1, 4), (5, 8), (9, 12), (13, 25))
SEED = 20261130  # not a renderer seed: training data is rendered with small seeds
TARGET_PER_MARGIN, TARGET_LONG = 0.97, 0.95


def bucket_of(text: str) -> str:
    """The length bucket of a text, e.g. ``"13-25"``."""
    return next(f"{lo}-{hi}" for lo, hi in BUCKETS if lo <= len(text) <= hi)


@dataclass(frozen=True)
class Sample:
    """One text as rendered: its label, font and polarity (the margins are applied per crop),
    and with ``--colour`` its (text, background) colours."""

    text: str
    font: str
    inverted: bool
    colours: tuple[RGB, RGB] | None = None
    spaced: bool = False  # scored with its spaces (--phrases)

    @property
    def bucket(self) -> str:
        return bucket_of(self.text)


def draw_texts(per_bucket: int, seed: int = SEED, faces: list[FontFace] | None = None, colour: bool = False, phrases: bool = False) -> list[Sample]:
    """``per_bucket`` texts for each length bucket, each with a held-out font and a polarity;
    with ``colour``, the same texts, each with a weak-luma colour pair (``with_colours``); with
    ``phrases``, phrases of 2-3 words scored with their spaces (the 1-4 bucket stays empty).

    Raises ``RuntimeError`` when no held-out font family is installed.
    """
    faces = discover_fonts(DEFAULT_CHARS, families="held_out") if faces is None else faces
    families = by_family(faces)
    if not families:
        raise RuntimeError(
            "none of the held-out font families is installed; apt-get install fonts-liberation2 fonts-lato "
            "(or: apt-get install $(python -m model.training.fonts --packages))"
        )
    rng = random.Random(seed)
    if phrases:
        only_phrases = TextMix(**{k: 0.0 for k in asdict(TextMix())} | {"phrase": 1.0})
        sampler = TextSampler(DEFAULT_CHARS + " ", 25, Lexicon(), only_phrases)
    else:
        # Long tokens are a quarter of the mix here (7 % in training data) so the 13-25 bucket fills.
        sampler = TextSampler(DEFAULT_CHARS, 25, Lexicon(), replace(TextMix(), long_token=0.33))
    want = {f"{lo}-{hi}": 0 if phrases and lo == 1 else per_bucket for lo, hi in BUCKETS}
    out: list[Sample] = []
    while any(want.values()):
        text = sampler.sample(rng)
        bucket = bucket_of(text)
        if not want[bucket]:
            continue
        fitting = [f for f in rng.choice(families) if set(text) - {" "} <= f.chars]
        if not fitting:
            continue
        want[bucket] -= 1
        out.append(Sample(text, rng.choice(fitting).path, inverted=len(out) % 2 == 1, spaced=phrases))
    return with_colours(out, seed) if colour else out


def with_colours(samples: list[Sample], seed: int) -> list[Sample]:
    """``samples``, each with a (text, background) pair of weak luma and strong chroma drawn
    from a stream of its own (the texts and fonts stay the grey benchmark's); an inverted
    sample swaps the pair."""
    rng = random.Random(f"{seed}:colour")
    out = []
    for s in samples:
        text, background = weak_luma_pair(rng)
        out.append(replace(s, colours=(background, text) if s.inverted else (text, background)))
    return out


def render(sample: Sample, margin: float, size_px: int = 48) -> bytes:
    """The sample drawn at ``size_px``, cropped at the ink plus ``margin`` x ink height, as PNG
    bytes: grey, or RGB in the sample's colours."""
    font = ImageFont.truetype(sample.font, size_px)
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), sample.text, font=font)
    pad = size_px
    mask = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    ImageDraw.Draw(mask).text((pad - left, pad - top), sample.text, font=font, fill=255)
    x0, y0, x1, y1 = mask.getbbox() or (0, 0, mask.width, mask.height)
    m = round(margin * (y1 - y0))
    box = (x0 - m, y0 - m, x1 + m, y1 + m)
    if sample.colours is None:
        mode, (fg, bg) = "L", ((255, 0) if sample.inverted else (0, 255))
    else:
        mode, (fg, bg) = "RGB", sample.colours
    img = Image.composite(Image.new(mode, mask.size, fg), Image.new(mode, mask.size, bg), mask).crop(box)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def exact(prediction: str, label: str, spaced: bool = False) -> bool:
    """Case-sensitive exact match, whitespace removed on both sides; with ``spaced``, one space
    between words kept on both sides (a reading must hold the label's spaces)."""
    join = " ".join if spaced else "".join
    return join(prediction.split()) == join(label.split())


def accuracy(samples: list[Sample], by_condition: dict[float, list[str]]) -> tuple[dict[str, float], dict[str, float | None], float]:
    """Exact accuracy per condition (a margin, an arc: the keys, written with ``:g``), per
    length bucket (over every condition) and overall, from each condition's readings of ``samples``."""
    per_condition = {f"{k:g}": sum(exact(p, s.text, s.spaced) for p, s in zip(preds, samples)) / len(samples) for k, preds in by_condition.items()}
    per_bucket = {}
    for lo, hi in BUCKETS:
        key = f"{lo}-{hi}"
        hits = [exact(p, s.text, s.spaced) for preds in by_condition.values() for p, s in zip(preds, samples) if s.bucket == key]
        per_bucket[key] = sum(hits) / len(hits) if hits else None
    total = [exact(p, s.text, s.spaced) for preds in by_condition.values() for p, s in zip(preds, samples)]
    return per_condition, per_bucket, sum(total) / len(total)


def score(samples: list[Sample], by_margin: dict[float, list[str]]) -> dict:
    """Accuracy per margin, per length bucket (over every margin) and overall."""
    per_margin, per_bucket, overall = accuracy(samples, by_margin)
    return {
        "per_margin": per_margin,
        "per_length": per_bucket,
        "overall": overall,
        "targets_met": min(per_margin.values()) >= TARGET_PER_MARGIN and (per_bucket["13-25"] or 0.0) >= TARGET_LONG,
    }


@dataclass
class EngineReadings:
    """What ``run_engines`` read: per engine that loaded, its predictions per folder (in the
    folders' order, each in the folder's file order); its ``info()``; the engines skipped (name → why)."""

    predictions: dict[str, list[list[str]]]
    info: dict[str, dict]
    skipped: dict[str, str]


def run_engines(folders: list[Folder], names: list[str], weights: Path, threads: int, progress: bool) -> EngineReadings | None:
    """Every engine of ``names`` that loads, one crop per call (``bench.peers.run_benchmark``),
    on every folder; the engines are closed after. When none loads, it says so on stderr and
    returns None."""
    peers, skipped = [], {}
    for peer in build_peers(names, weights, [1], threads):
        try:
            peer.load()
            peers.append(peer)
        except (PeerUnavailable, CheckpointError) as exc:
            skipped[peer.name] = str(exc)
            print(f"{peer.name}: skipped ({exc})", file=sys.stderr)
    if not peers:
        print("error: no engine could run", file=sys.stderr)
        return None
    try:
        results = run_benchmark(folders, peers, progress=progress)
        predictions = {peer.name: [results[peer.name][0].predictions[f.name] for f in folders] for peer in peers}
        return EngineReadings(predictions, {peer.name: peer.info() for peer in peers}, skipped)
    finally:
        for peer in peers:
            peer.close()


def write_report(report: dict, path: Path | None) -> None:
    """Write a bench report as JSON to ``path`` (its folder made); nothing without one."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")


def engine_table(report: dict, per: str, conditions: list[str], headers: list[str]) -> list[str]:
    """A markdown table, one row per engine of ``report``: its accuracy under each condition
    (``report["engines"][name][per][condition]``, columns titled ``headers``), each length
    bucket, and overall, in %."""
    buckets = [f"{lo}-{hi}" for lo, hi in BUCKETS]
    lines = ["| engine | " + " | ".join(headers) + " | " + " | ".join(f"{b} chars" for b in buckets) + " | overall |"]
    lines.append("|---|" + "---:|" * (len(conditions) + len(buckets) + 1))
    for name, r in report["engines"].items():
        cells = [f"{100 * r[per][c]:.1f}" for c in conditions] + ["—" if r["per_length"][b] is None else f"{100 * r['per_length'][b]:.1f}" for b in buckets]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | **{100 * r['overall']:.1f}** |")
    return lines


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """The flags both text benchmarks take: the checkpoint, the engines, how many texts, the seed, threads and output."""
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="safl checkpoint (default: the shipped weights)")
    p.add_argument("--peers", nargs="+", default=["safl", "rapidocr", "rapidocr3"], choices=["safl", "rapidocr", "rapidocr3"])
    p.add_argument("--per-bucket", type=int, default=50, help="texts per length bucket (default: 50)")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--no-progress", action="store_true")


def to_markdown(report: dict) -> str:
    margins = list(next(iter(report["engines"].values()))["per_margin"])
    colour = ", weak-luma colours" if report.get("colour") else ""
    kind = "Clean phrases (scored with their spaces)" if report.get("phrases") else "Clean text"
    lines = [f"{kind}, held-out fonts{colour} ({report['texts']} texts x {len(margins)} margins, exact case-sensitive accuracy)", ""]
    lines += engine_table(report, "per_margin", margins, [f"margin {float(m) * 100:g} %" for m in margins])
    lines.append("")
    lines.append(f"Targets: >= {100 * TARGET_PER_MARGIN:g} % at every margin, >= {100 * TARGET_LONG:g} % for 13-25 characters.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].rstrip(":"), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_flags(p)
    p.add_argument("--margins", type=float, nargs="+", default=list(MARGINS), help="margins, as fractions of the ink height")
    p.add_argument("--predictions", type=Path, help="write every crop's label and readings here (TSV)")
    p.add_argument("--colour", action="store_true", help="the same texts in weak-luma, strong-chroma colour pairs (RGB crops)")
    p.add_argument("--phrases", action="store_true", help="phrases of 2-3 words instead of words, scored with their spaces")
    args = p.parse_args(argv)
    if args.per_bucket < 1:
        p.error("--per-bucket must be at least 1")
    try:
        samples = draw_texts(args.per_bucket, args.seed, colour=args.colour, phrases=args.phrases)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    folders = [
        Folder(f"{m:g}", Path(f"margin-{m:g}"), [f"{i:04d}.png" for i in range(len(samples))], [s.text for s in samples], [render(s, m) for s in samples])
        for m in args.margins
    ]
    read = run_engines(folders, args.peers, args.weights, args.threads, progress=not args.no_progress)
    if read is None:
        return 2
    engines = {name: score(samples, dict(zip(args.margins, per_folder))) for name, per_folder in read.predictions.items()}
    report = {
        "texts": len(samples),
        "seed": args.seed,
        "colour": args.colour,
        "phrases": args.phrases,
        "margins": args.margins,
        "engines": engines,
        "info": read.info,
        "skipped": read.skipped,
    }
    print(to_markdown(report))
    write_report(report, args.json)
    if args.predictions:
        rows = ["margin\tlabel\tfont\tinverted\t" + "\t".join(read.predictions)]
        for k, m in enumerate(args.margins):
            for i, s in enumerate(samples):
                rows.append("\t".join([f"{m:g}", s.text, Path(s.font).name, str(s.inverted)] + [per_folder[k][i] for per_folder in read.predictions.values()]))
        args.predictions.parent.mkdir(parents=True, exist_ok=True)
        args.predictions.write_text("\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
