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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..preprocess import ViewConfig, to_tensor
from ..reading import Recognition, read_views
from ..safl import SAFL
from .data import ArrayDataset
from .protocol import normalize_36, normalize_cs

__all__ = ["normalize_36", "normalize_cs", "evaluate", "predict", "read_batched", "score"]


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
def read_batched(model: SAFL, images: np.ndarray, batch_size: int, amp_dtype: torch.dtype | None) -> list[Recognition]:
    """One reading per image of ``images`` (``model.preprocess.resize`` output stacked:
    uint8 ``[N, H, W]`` or ``[N, H, W, 3]``), read ``batch_size`` at a time on the model's
    device, with autocast to ``amp_dtype`` if given; each image as it is, no further
    views (``predict`` reads those). Raises ``TypeError`` for pixels that are not uint8."""
    device = next(model.parameters()).device
    out: list[Recognition] = []
    for i in range(0, len(images), batch_size):
        out += model.recognize(to_tensor(images[i : i + batch_size]).to(device), amp_dtype=amp_dtype)
    return out


def predict(
    model: SAFL,
    images,
    batch_size: int = 128,
    amp_dtype: torch.dtype | None = None,
    extra_views: dict[int, np.ndarray] | None = None,
    confident_at: float = ViewConfig().confident_at,
) -> tuple[list[str], list[float]]:
    """Texts and confidences for a uint8 image array, in batches.

    With ``extra_views`` (``ArrayDataset.extra_views``) the samples are read as the
    service reads them (``model.reading.read_views``): a sample whose image alone reads
    less confidently than ``confident_at`` is also read in its further views.
    """
    if not extra_views:
        readings = read_batched(model, images, batch_size, amp_dtype)
    else:
        per_sample = [[images[i], *extra_views.get(i, ())] for i in range(len(images))]
        readings = read_views(lambda vs: read_batched(model, np.stack(vs), batch_size, amp_dtype), per_sample, confident_at)
    return [r.text for r in readings], [r.confidence for r in readings]


def evaluate(
    model: SAFL, datasets: list[ArrayDataset], batch_size: int = 128, worst: int = 5, confident_at: float = ViewConfig().confident_at
) -> list[DatasetResult]:
    """Metrics per data set, with the ``worst`` most confident mistakes of each; the
    samples are read in their views (``predict``)."""
    results = []
    for ds in datasets:
        preds, confs = predict(model, ds.images, batch_size, extra_views=ds.extra_views, confident_at=confident_at)
        n, acc36, acc_cs, one_minus_ned = score(preds, ds.labels)
        wrong = [
            Example(i, ds.labels[i], preds[i], round(confs[i], 4), ds.sources[i] if ds.sources else "")
            for i in range(len(preds))
            if normalize_36(ds.labels[i]) and normalize_36(preds[i]) != normalize_36(ds.labels[i])
        ]
        wrong.sort(key=lambda e: -e.confidence)
        results.append(DatasetResult(ds.name, n, acc36, acc_cs, one_minus_ned, wrong[:worst], ds.folder))
    return results


def to_markdown(results: list[DatasetResult], title: str = "") -> str:
    """A table (and the worst examples) in markdown."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| dataset | n | acc (36-char) | acc (case-sensitive) | 1 - NED |", "|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.name} | {r.n} | {100 * r.acc36:.2f} % | {100 * r.acc_cs:.2f} % | {r.one_minus_ned:.4f} |")
    if len(results) > 1:
        total = sum(r.n for r in results)
        w = lambda attr: sum(getattr(r, attr) * r.n for r in results) / max(total, 1)  # noqa: E731
        lines.append(f"| **all (weighted)** | {total} | {100 * w('acc36'):.2f} % | {100 * w('acc_cs'):.2f} % | {w('one_minus_ned'):.4f} |")
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
