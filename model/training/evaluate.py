"""Word accuracy of a model on labelled data, under the STR literature's protocol and
case-sensitively.

- ``acc36``: lowercase both sides and keep only ``[0-9a-z]`` (the 36-character
  protocol of the STR benchmarks); a sample whose label is empty after this is skipped.
- ``acc_cs``: exact, case-sensitive match with the label's spaces removed (the model
  reads single words), punctuation included.
- ``one_minus_ned``: 1 − NED, the mean of ``1 - edit_distance / max(len)`` on the
  36-character strings (1 is a perfect reading); result files keep it under the JSON
  key ``"ned"`` they have always used (``as_json_dict``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..calibration import Calibration, Reliability, calibrate_all, reliability
from ..engine import Engine, as_engine
from ..lexicon import Lexicon
from ..preprocess import ViewConfig, to_tensor
from ..reading import Recognition, read_views
from ..safl import SAFL
from ..search import PLAIN, DecodeOptions
from .data import ArrayDataset
from .protocol import normalize_36, normalize_cs

__all__ = ["normalize_36", "normalize_cs", "evaluate", "lexicon_accuracy", "pooled", "predict", "read_batched", "score"]


@dataclass
class Example:
    """One prediction, for error listings."""

    index: int
    label: str
    prediction: str
    confidence: float
    #: The sample's file as ``labels.tsv`` names it, relative to ``DatasetResult.folder``
    #: (``ArrayDataset.sources``); "" when not known (rendered shards): then ``index`` tells.
    file: str = ""


@dataclass
class DatasetResult:
    """Metrics of one data set."""

    name: str
    n: int
    acc36: float
    acc_cs: float
    one_minus_ned: float  #: 1 − NED (higher is better); JSON key "ned"
    worst: list[Example] = field(default_factory=list)
    #: The folder (or LMDB) the data set was read from, as given; "" when not known.
    folder: str = ""
    #: With ``lexicon_size`` > 0: acc36 with a closed vocabulary of that many words per
    #: sample (``lexicon_accuracy``), over ``lexicon_n`` samples.
    lexicon_size: int = 0
    lexicon_n: int = 0
    acc36_lexicon: float | None = None
    #: Expected calibration error (10 bins) of the confidences against exact, case-sensitive
    #: correctness (``acc_cs``), and its bins (``model.calibration.Reliability``).
    ece: float | None = None
    reliability: dict[str, list] | None = None


def score(predictions: list[str], labels: list[str]) -> tuple[int, float, float, float]:
    """``(n, acc36, acc_cs, one_minus_ned)`` for parallel lists; n counts samples scored under the 36 protocol."""
    from rapidfuzz.distance import Levenshtein  # training extra: `safl serve` must not need it

    n = correct36 = correct_cs = n_cs = 0
    one_minus_ned = 0.0
    for pred, gt in zip(predictions, labels):
        g_cs = normalize_cs(gt)
        if g_cs:
            n_cs += 1
            correct_cs += normalize_cs(pred) == g_cs
        g, p = normalize_36(gt), normalize_36(pred)
        if not g:
            continue
        n += 1
        correct36 += p == g
        one_minus_ned += 1.0 - Levenshtein.distance(p, g) / max(len(p), len(g))
    return n, correct36 / max(n, 1), correct_cs / max(n_cs, 1), one_minus_ned / max(n, 1)


@torch.no_grad()
def read_batched(
    model: Engine | SAFL, images: np.ndarray, batch_size: int, amp_dtype: torch.dtype | None, options: Sequence[DecodeOptions] | None = None
) -> list[Recognition]:
    """One reading per image of ``images`` (``model.preprocess.resize`` output stacked:
    uint8 ``[N, H, W]`` or ``[N, H, W, 3]``) by ``model``'s engine (``model.engine.as_engine``),
    read ``batch_size`` at a time on the network's device, with autocast to ``amp_dtype`` if
    given, each as its ``options`` say (one per image; ``None``: greedy); each image as it is,
    no further views (``predict`` reads those). Raises ``TypeError`` for pixels that are not uint8."""
    engine = as_engine(model)
    device = next(engine.model.parameters()).device
    out: list[Recognition] = []
    for i in range(0, len(images), batch_size):
        opts = None if options is None else options[i : i + batch_size]
        out += engine.recognize(to_tensor(images[i : i + batch_size]).to(device), amp_dtype=amp_dtype, options=opts)
    return out


def predict(
    model: Engine | SAFL,
    images,
    batch_size: int = 128,
    amp_dtype: torch.dtype | None = None,
    extra_views: dict[int, np.ndarray] | None = None,
    confident_at: float = ViewConfig().confident_at,
    options: Sequence[DecodeOptions] | None = None,
    calibration: Calibration | None = None,
) -> tuple[list[str], list[float]]:
    """Texts and confidences for a uint8 image array, in batches, each sample read as its
    ``options`` say (one per sample; ``None``: greedy); the confidences calibrated by
    ``calibration`` (``model.calibration.calibrate``, as the service answers; ``None``: raw).

    With ``extra_views`` (``ArrayDataset.extra_views``) the samples are read as the
    service reads them (``model.reading.read_views``): a sample whose image alone reads
    less confidently than ``confident_at`` is also read in its further views.
    """
    opts = list(options) if options is not None else [PLAIN] * len(images)
    per_sample = [[(view, opts[i]) for view in (images[i], *(extra_views or {}).get(i, ()))] for i in range(len(images))]

    def read(views: list[tuple[np.ndarray, DecodeOptions]]) -> list[Recognition]:
        return read_batched(model, np.stack([v for v, _ in views]), batch_size, amp_dtype, None if options is None else [o for _, o in views])

    readings = calibrate_all(read_views(read, per_sample, confident_at), calibration)
    return [r.text for r in readings], [r.confidence for r in readings]


def lexicon_accuracy(
    model: Engine | SAFL,
    ds: ArrayDataset,
    size: int,
    batch_size: int = 128,
    seed: int = 0,
    confident_at: float = ViewConfig().confident_at,
    distractors_from: Sequence[str] | None = None,
) -> tuple[int, float]:
    """``(n, acc36)`` with a closed vocabulary per sample, the IIIT5K protocol (Mishra et al.,
    BMVC 2012, "small lexicon"): the sample's own label and ``size - 1`` distractors drawn
    (``seed``) from the other labels of ``distractors_from`` (default: the data set's),
    distinct under the 36-character protocol; read with ``DecodeOptions(lexicon=...)`` in
    the sample's views.

    Only samples whose label the model can read (``Charset.filter_label``) are scored.
    Raises ``ValueError`` if there are fewer than ``size`` distinct readable labels to draw from.
    """
    network = as_engine(model).model
    charset, max_len = network.charset, network.config.max_len
    words = [charset.filter_label(label, max_len) for label in ds.labels]
    readable = [charset.filter_label(label, max_len) for label in (ds.labels if distractors_from is None else distractors_from)]
    pool = list({normalize_36(w): w for w in readable if w and normalize_36(w)}.items())
    if len(pool) < size:
        raise ValueError(f"{len(pool)} distinct readable labels to draw from, fewer than a lexicon of {size}")
    rng = np.random.default_rng(seed)
    scored, options = [], []
    for i, word in enumerate(words):
        key = normalize_36(word or "")
        if not key:
            continue
        picks = rng.choice(len(pool), size=size, replace=False)
        distractors = [w for k, w in (pool[j] for j in picks) if k != key][: size - 1]
        lexicon = Lexicon.build([word, *distractors], charset, max_len)
        scored.append(i)
        options.append(DecodeOptions(lexicon=lexicon))
    extra = {n: ds.extra_views[i] for n, i in enumerate(scored) if i in ds.extra_views}
    preds, _ = predict(model, ds.images[scored], batch_size, extra_views=extra, confident_at=confident_at, options=options)
    correct = sum(normalize_36(p) == normalize_36(ds.labels[i]) for p, i in zip(preds, scored))
    return len(scored), correct / max(len(scored), 1)


def evaluate(
    model: Engine | SAFL,
    datasets: list[ArrayDataset],
    batch_size: int = 128,
    worst: int = 5,
    confident_at: float = ViewConfig().confident_at,
    lexicon_size: int = 0,
    calibration: Calibration | None = None,
) -> list[DatasetResult]:
    """Metrics per data set, with the ``worst`` most confident mistakes of each and the
    calibration error of the confidences (``calibration``: as the service answers; ``None``:
    the decoder's own); the samples are read in their views (``predict``). With
    ``lexicon_size`` > 0, also the accuracy with a lexicon of that many words per sample
    (``lexicon_accuracy``, the distractors drawn from the labels of all ``datasets``)."""
    results = []
    for ds in datasets:
        preds, confs = predict(model, ds.images, batch_size, extra_views=ds.extra_views, confident_at=confident_at, calibration=calibration)
        n, acc36, acc_cs, one_minus_ned = score(preds, ds.labels)
        wrong = [
            Example(i, ds.labels[i], preds[i], round(confs[i], 4), ds.sources[i] if ds.sources else "")
            for i in range(len(preds))
            if normalize_36(ds.labels[i]) and normalize_36(preds[i]) != normalize_36(ds.labels[i])
        ]
        wrong.sort(key=lambda e: -e.confidence)
        result = DatasetResult(ds.name, n, acc36, acc_cs, one_minus_ned, wrong[:worst], ds.folder)
        scored = [i for i, label in enumerate(ds.labels) if normalize_cs(label)]
        rel = reliability([confs[i] for i in scored], [normalize_cs(preds[i]) == normalize_cs(ds.labels[i]) for i in scored])
        result.ece, result.reliability = rel.ece, rel.to_dict()
        if lexicon_size:
            result.lexicon_size = lexicon_size
            # Distractors from every data set's labels: a small validation part alone has too few.
            pool = [label for d in datasets for label in d.labels]
            result.lexicon_n, result.acc36_lexicon = lexicon_accuracy(model, ds, lexicon_size, batch_size, confident_at=confident_at, distractors_from=pool)
        results.append(result)
    return results


def pooled_reliability(results: Sequence[DatasetResult]) -> Reliability | None:
    """The data sets' reliability bins together (each bin's means weighted by its counts);
    ``None`` when none has any."""
    rels = [Reliability.from_dict(r.reliability) for r in results if r.reliability]
    if not rels:
        return None
    counts = [sum(rel.counts[i] for rel in rels) for i in range(len(rels[0].counts))]

    def mean(attr: str, i: int) -> float:
        return sum(rel.counts[i] * getattr(rel, attr)[i] for rel in rels if rel.counts[i]) / counts[i] if counts[i] else float("nan")

    return Reliability(counts, [mean("confidence", i) for i in range(len(counts))], [mean("accuracy", i) for i in range(len(counts))])


def pooled(results: Sequence[DatasetResult], attr: str = "acc36") -> float:
    """A metric over all the data sets' samples together (each set weighted by its ``n``):
    the "weighted" figure of the STR literature. 0 when there are no samples."""
    total = sum(r.n for r in results)
    return sum(getattr(r, attr) * r.n for r in results) / max(total, 1)


def to_markdown(results: list[DatasetResult], title: str = "") -> str:
    """A table (and the worst examples) in markdown."""
    lines = [f"### {title}", ""] if title else []
    size = max((r.lexicon_size for r in results), default=0)
    lex_head, lex_rule = (f" acc with a {size}-word lexicon |", "---:|") if size else ("", "")
    lines += [f"| dataset | n | acc (36-char) | acc (case-sensitive) | 1 - NED |{lex_head}", f"|---|---:|---:|---:|---:|{lex_rule}"]
    for r in results:
        lex = f" {100 * r.acc36_lexicon:.2f} % |" if size and r.acc36_lexicon is not None else (" |" if size else "")
        lines.append(f"| {r.name} | {r.n} | {100 * r.acc36:.2f} % | {100 * r.acc_cs:.2f} % | {r.one_minus_ned:.4f} |{lex}")
    if len(results) > 1:
        total = sum(r.n for r in results)
        w = lambda attr: pooled(results, attr)  # noqa: E731
        lex = ""
        if size:
            lex_total = sum(r.lexicon_n for r in results)
            lex = f" {100 * sum((r.acc36_lexicon or 0.0) * r.lexicon_n for r in results) / max(lex_total, 1):.2f} % |"
        lines.append(f"| **all (weighted)** | {total} | {100 * w('acc36'):.2f} % | {100 * w('acc_cs'):.2f} % | {w('one_minus_ned'):.4f} |{lex}")
    eces = [f"{r.name} {r.ece:.3f}" for r in results if r.ece is not None]
    everything = pooled_reliability(results)
    if eces and everything is not None:
        both = f"; all {everything.ece:.3f}" if len(eces) > 1 else ""
        lines += ["", f"Calibration error of the confidence (ECE, 10 bins, exact case-sensitive match): {', '.join(eces)}{both}"]
    for r in results:
        if r.worst:
            lines += ["", f"Most confident mistakes on {r.name}" + (f" (in `{r.folder}`)" if r.folder else "") + ":", ""]
            lines += [f"- {_where(e)}: `{e.label}` → `{e.prediction}` (confidence {e.confidence:.2f})" for e in r.worst]
    return "\n".join(lines) + "\n"


def _where(e: Example) -> str:
    """The sample of a listed mistake: its file, else its index in the data set."""
    return f"`{e.file}`" if e.file else f"sample {e.index}"


#: Fields written under another JSON key: the key every result file has used so far.
JSON_KEYS = {"one_minus_ned": "ned"}


def as_json_dict(result: Any) -> dict[str, Any]:
    """The fields of a dataclass of metrics (``DatasetResult``, bench's ``Metrics``) as a
    dict for JSON, in field order, with ``one_minus_ned`` under its key ``"ned"``
    (``JSON_KEYS``). Raises ``TypeError`` for anything but a dataclass instance."""
    return {JSON_KEYS.get(k, k): v for k, v in asdict(result).items()}


def to_json(results: list[DatasetResult], path: Path | None = None, extra: dict | None = None) -> dict:
    """Results as a dict (and written to ``path`` when given); see ``as_json_dict``."""
    data = {**(extra or {}), "datasets": [as_json_dict(r) for r in results]}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")
    return data
