"""A calibrated confidence: the probability that a reading's text is exactly right.

The decoder's probability of a whole word (``Recognition.confidence`` as decoded: the
product of its characters' and the end token's probabilities) ranks readings well but is
far below how often they are right: focal loss makes the character probabilities less
peaked (Mukhoti et al., NeurIPS 2020). ``Calibration`` maps it to the probability that
the text is exactly right, case-sensitive, with Platt scaling (Platt, 1999) of its log-odds:

    confidence = sigmoid(a * logit(p) + b)

fitted by logistic regression on labelled crops no model of the checkpoint's lineage
trained on. Two parameters and monotone in ``p``: a more probable reading is never less
confident, and a few hundred crops fit it. Temperature scaling of the logits (Guo et al.,
ICML 2017, "On Calibration of Modern Neural Networks") would need the decoders' logits;
logistic maps of ``log p`` alone, of ``log p`` and the length, isotonic regression and beta
calibration were measured too (``weights/MODEL_CARD.md``, "Confidence").

The calibration lives in the checkpoint's sidecar under ``"calibration"`` (``read_calibration``,
``write_calibration``); a checkpoint without one reads as before. It is applied once, to the
answer of a crop (``calibrate``), after its views were chosen by the decoder's probability,
so readings are the same with and without it. NumPy only: the PyTorch-free reader uses it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .reading import Alternative, Recognition

#: The sidecar key (``model.checkpoint``) the calibration is stored under.
SIDECAR_KEY = "calibration"
METHOD = "platt-logit"
#: Probabilities are clipped to [EPS, 1 - EPS] before their log-odds are taken.
EPS = 1e-9
#: Bins of the expected calibration error (Guo et al. 2017, section 2).
ECE_BINS = 10


class CalibrationError(ValueError):
    """A sidecar's calibration cannot be used: an unknown method or parameters that are not numbers."""


def _logit(p: np.ndarray | float) -> np.ndarray:
    q = np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0 - EPS)
    return np.log(q) - np.log1p(-q)


@dataclass(frozen=True)
class Calibration:
    """``confidence = sigmoid(a * logit(p) + b)`` of the decoder's probability ``p`` of a
    reading; ``fitted_on`` says on what (data sets, part, number of crops), for the record."""

    a: float
    b: float
    fitted_on: str = ""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.a) and math.isfinite(self.b)) or self.a <= 0:
            raise CalibrationError(f"calibration needs finite parameters and a > 0 (monotone), got a={self.a}, b={self.b}")

    def __call__(self, p: np.ndarray | float) -> np.ndarray:
        """Calibrated confidences (float64, the shape of ``p``) of decoder probabilities ``p`` in [0, 1]."""
        z = self.a * _logit(p) + self.b
        return 0.5 * (1.0 + np.tanh(0.5 * z))  # sigmoid without overflow

    def to_dict(self) -> dict[str, Any]:
        return {"method": METHOD, "a": self.a, "b": self.b, "fitted_on": self.fitted_on}

    @classmethod
    def from_dict(cls, raw: Any) -> Calibration:
        """Raises ``CalibrationError`` for anything but a ``to_dict`` of this method."""
        if not isinstance(raw, dict) or raw.get("method") != METHOD:
            raise CalibrationError(f"unknown calibration {raw!r:.80}: this safl applies method {METHOD!r}")
        try:
            return cls(float(raw["a"]), float(raw["b"]), str(raw.get("fitted_on", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationError(f"calibration parameters are not numbers: {exc}") from None

    @classmethod
    def fit(cls, p: Sequence[float] | np.ndarray, right: Sequence[bool] | np.ndarray, fitted_on: str = "", l2: float = 1e-3) -> Calibration:
        """Logistic regression of ``right`` on ``logit(p)`` (Newton's method, a small L2 penalty
        so that separable data still has an answer). Raises ``ValueError`` for fewer than 2
        readings or none right or none wrong (nothing to fit)."""
        x, y = _logit(p), np.asarray(right, dtype=np.float64)
        if len(x) != len(y) or len(x) < 2 or y.min() == y.max():
            raise ValueError(f"a calibration needs right and wrong readings: got {int(y.sum())} right of {len(y)}")
        X = np.stack([x, np.ones_like(x)], axis=1)
        w = np.array([1.0, 0.0])
        for _ in range(100):
            q = 0.5 * (1.0 + np.tanh(0.5 * (X @ w)))
            step = np.linalg.solve((X.T * (q * (1 - q))) @ X + l2 * np.eye(2), X.T @ (q - y) + l2 * w)
            w -= step
            if np.abs(step).max() < 1e-10:
                break
        return cls(float(w[0]), float(w[1]), fitted_on)


def _scaled(chars: Sequence[float], raw: float, calibrated: float) -> list[float]:
    # Each character's probability raised to the power that turns the decoder's probability of
    # the word into the calibrated one: their product (with the end token's) is then the
    # confidence, and their order, the least sure character first, is kept.
    if not 0.0 < raw < 1.0 or not 0.0 < calibrated < 1.0:
        return list(chars)
    power = math.log(calibrated) / math.log(raw)
    return [c**power for c in chars]


def calibrate(r: Recognition, calibration: Calibration | None) -> Recognition:
    """``r`` with ``confidence`` calibrated and the decoder's probability kept as
    ``raw_confidence``; ``char_confidences`` raised to one common power so that their
    product with the end token's (raised likewise) is the confidence.

    A reading whose probabilities were renormalised over an allowlist or blocklist is scored
    by ``model_probability``, the unconstrained model's probability of its text: a reading
    forced away from what the model sees comes back unsure. Of the ``top_k`` alternatives, the
    reading's own text gets its confidence and each other text a share of what is left,
    ``1 - confidence``, in proportion to the model's probability of it among the texts other
    than the reading's (``p_k / (1 - p)``, scaled by the same constraint factor), so the
    confidences of one crop's alternatives never add up to more than 1. Without a
    ``calibration`` only ``raw_confidence`` is added; a reading that has one is returned as it is.
    """
    if r.raw_confidence is not None:  # calibrated already
        return r
    raw = r.confidence
    if calibration is None:
        return replace(r, raw_confidence=raw)
    p = raw if r.model_probability is None else r.model_probability
    factor = p / raw if raw > 0 else 0.0
    conf = float(calibration(p))
    # Not the map itself applied to each alternative: on the 2,025 val crops that listed the
    # other texts 3x more confident than they were right (mean 0.116, 3.7 % right, ECE 0.079;
    # shared out of the rest, ECE 0.016) and over 1 in all for 73 % of crops
    # (docs/results/alternatives_calibration_8f51e07e4c6a.json).
    rest, others = 1.0 - conf, 1.0 - p

    def share(a: Alternative) -> float:
        if a.text == r.text:
            return conf
        return min(rest, rest * a.confidence * factor / others) if others > 0 else 0.0

    alternatives = tuple(Alternative(a.text, share(a)) for a in r.alternatives)
    return replace(r, confidence=conf, raw_confidence=raw, char_confidences=_scaled(r.char_confidences, raw, conf), alternatives=alternatives)


def calibrate_all(readings: Sequence[Recognition], calibration: Calibration | None) -> list[Recognition]:
    """``calibrate`` of each reading."""
    return [calibrate(r, calibration) for r in readings]


def sidecar_path(weights: str | os.PathLike[str]) -> Path:
    """The ``.json`` sidecar of a ``.safetensors`` checkpoint (or of its stem)."""
    p = Path(weights)
    return p.with_suffix(".json") if p.suffix in (".safetensors", ".json") else p.with_name(p.name + ".json")


def read_calibration(weights: str | os.PathLike[str]) -> Calibration | None:
    """The calibration in a checkpoint's sidecar, ``None`` when it has none. Raises
    ``CalibrationError`` for one that cannot be used, ``OSError`` for an unreadable sidecar."""
    try:
        meta = json.loads(sidecar_path(weights).read_text())
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"sidecar of {weights} is not valid JSON: {exc}") from None
    raw = meta.get(SIDECAR_KEY) if isinstance(meta, dict) else None
    return None if raw is None else Calibration.from_dict(raw)


def write_calibration(weights: str | os.PathLike[str], calibration: Calibration | None, report: dict[str, Any] | None = None) -> Path:
    """Store ``calibration`` (``None``: remove it) in the checkpoint's sidecar, with
    ``report`` (its measurements) beside it, atomically; the rest of the sidecar is kept
    as it was. The weights, their sha256 and so the model id are untouched."""
    from .checkpoint import _atomic_write

    path = sidecar_path(weights)
    meta = json.loads(path.read_text())
    meta.pop(SIDECAR_KEY, None)
    if calibration is not None:
        meta[SIDECAR_KEY] = {**calibration.to_dict(), **({"report": report} if report else {})}
    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    return path


@dataclass(frozen=True)
class Reliability:
    """Confidences against correctness in ``ECE_BINS`` equal-width bins: per bin the number of
    readings, their mean confidence and the share right (NaN for an empty bin)."""

    counts: list[int]
    confidence: list[float]
    accuracy: list[float]

    def to_dict(self) -> dict[str, list]:
        """For JSON: an empty bin's means as ``None`` (JSON has no NaN)."""
        clean = lambda v: [None if math.isnan(x) else x for x in v]  # noqa: E731
        return {"counts": self.counts, "confidence": clean(self.confidence), "accuracy": clean(self.accuracy)}

    @classmethod
    def from_dict(cls, raw: dict[str, list]) -> Reliability:
        """The inverse of ``to_dict``."""
        nan = lambda v: [math.nan if x is None else float(x) for x in v]  # noqa: E731
        return cls([int(k) for k in raw["counts"]], nan(raw["confidence"]), nan(raw["accuracy"]))

    @property
    def ece(self) -> float:
        """Expected calibration error: the count-weighted mean gap between confidence and
        accuracy over the bins (Guo et al. 2017, eq. 3; Naeini et al., AAAI 2015)."""
        n = sum(self.counts)
        return sum(k * abs(c - a) for k, c, a in zip(self.counts, self.confidence, self.accuracy) if k) / max(n, 1)


def reliability(confidence: Sequence[float] | np.ndarray, right: Sequence[bool] | np.ndarray, bins: int = ECE_BINS) -> Reliability:
    """``Reliability`` of confidences in [0, 1] (bin ``i`` holds [i/bins, (i+1)/bins), the last
    one 1.0 too) against whether each reading was right."""
    c, y = np.asarray(confidence, dtype=np.float64), np.asarray(right, dtype=np.float64)
    idx = np.minimum((c * bins).astype(int), bins - 1)
    counts = [int((idx == i).sum()) for i in range(bins)]
    mean = lambda v, i: float(v[idx == i].mean()) if counts[i] else math.nan  # noqa: E731
    return Reliability(counts, [mean(c, i) for i in range(bins)], [mean(y, i) for i in range(bins)])


def expected_calibration_error(confidence: Sequence[float] | np.ndarray, right: Sequence[bool] | np.ndarray, bins: int = ECE_BINS) -> float:
    """``reliability(...).ece``."""
    return reliability(confidence, right, bins).ece


def bootstrap_ece(confidence: Sequence[float] | np.ndarray, right: Sequence[bool] | np.ndarray, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the ECE (crops resampled with replacement). The
    ECE is biased upwards on few crops (a perfectly calibrated model shows about 0.04 on 300),
    and so is this interval: ``perfect_ece`` gives that floor."""
    c, y = np.asarray(confidence, dtype=np.float64), np.asarray(right, dtype=np.float64)
    rng = np.random.default_rng(seed)
    values = [expected_calibration_error(c[i], y[i]) for i in (rng.integers(0, len(c), len(c)) for _ in range(resamples))]
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def perfect_ece(confidence: Sequence[float] | np.ndarray, draws: int = 500, seed: int = 0) -> float:
    """The mean ECE of a perfectly calibrated model with these confidences (each reading right
    with probability its confidence): what sampling alone adds on this many crops."""
    c = np.asarray(confidence, dtype=np.float64)
    rng = np.random.default_rng(seed)
    return float(np.mean([expected_calibration_error(c, rng.random(len(c)) < c) for _ in range(draws)]))


def coverage(
    confidence: Sequence[float] | np.ndarray, right: Sequence[bool] | np.ndarray, thresholds: Sequence[float] = (0.5, 0.8, 0.9, 0.95)
) -> list[dict[str, float]]:
    """Per threshold: the share of readings kept at confidence ≥ it and the share of those right."""
    c, y = np.asarray(confidence, dtype=np.float64), np.asarray(right, dtype=bool)
    out = []
    for t in thresholds:
        kept = c >= t
        out.append({"threshold": t, "coverage": float(kept.mean()) if len(c) else 0.0, "accuracy": float(y[kept].mean()) if kept.any() else math.nan})
    return out
