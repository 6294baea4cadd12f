"""One answer for a crop read in several views (``model.preprocess.views``).

The crop as it is (its first view) is read first. Only a crop whose first reading is
unsure, less confident than ``ViewConfig.confident_at``, is read in its further views
too, and the most confident of all its readings is the answer. Confident first readings
are nearly always right, so this keeps the accuracy of reading every view at a fraction
of its cost (README, "Reading options", Views; the measurements: weights/TRAINING_LOG.md,
"Reading views").

``read_views`` does it with a synchronous reader, ``aread_answers`` with a coroutine (the
service's batcher), also saying which view each answer was read from (the service shows
that view's rectified image); both drive the same steps (``first_views`` → ``unsure`` →
``further_views`` → ``answers``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from .preprocess import PreprocessConfig, ViewConfig

View = TypeVar("View")

#: Most readings a crop may ask for (``top_k``; ``model.search`` finds them).
MAX_TOP_K = 10


@dataclass(frozen=True)
class Alternative:
    """One of the k most probable readings (``top_k``): its text and probability."""

    text: str
    confidence: float


@dataclass(frozen=True)
class Recognition:
    """One recognised word.

    As decoded, ``confidence`` is the product of the per-character probabilities *and* the
    probability of the end-of-word token, so it is the model's probability of the
    whole string under greedy decoding (an empty string has the EOS probability).
    Handed to users, it is calibrated (``model.calibration.calibrate``): the probability that
    ``text`` is exactly right, the decoder's probability kept as ``raw_confidence``.
    ``alternatives``: with ``top_k``, the k most probable readings found by beam search,
    most probable first (the first is ``text``); empty otherwise. ``model_probability``: for
    a reading renormalised over an allowlist or blocklist, the unconstrained model's
    probability of ``text`` (``model.scoring``), which its calibrated confidence is made from.
    """

    text: str
    confidence: float
    char_confidences: list[float]
    alternatives: tuple[Alternative, ...] = field(default=())
    raw_confidence: float | None = None
    model_probability: float | None = None


def most_confident_index(readings: Sequence[Recognition]) -> int:
    """Index of the most confident of one crop's readings; the first (the crop as it is) on
    a tie. Raises ``ValueError`` for no readings."""
    if not readings:
        raise ValueError("no readings to choose from")
    return max(range(len(readings)), key=lambda i: readings[i].confidence)


def most_confident(readings: Sequence[Recognition]) -> Recognition:
    """The most confident of one crop's readings; the first (the crop as it is) on a tie."""
    return readings[most_confident_index(readings)]


def first_views(per_crop: Sequence[Sequence[View]]) -> list[View]:
    """Each crop's first view: the crop as it is, as training saw it."""
    return [views[0] for views in per_crop]


def unsure(first: Sequence[Recognition], per_crop: Sequence[Sequence[View]], confident_at: float) -> list[int]:
    """Indices of the crops that have further views and whose first reading is less
    confident than ``confident_at``."""
    return [i for i, (r, views) in enumerate(zip(first, per_crop, strict=True)) if len(views) > 1 and r.confidence < confident_at]


def further_views(per_crop: Sequence[Sequence[View]], crops: Sequence[int]) -> list[View]:
    """The views after the first of ``crops``, crop after crop."""
    return [v for i in crops for v in per_crop[i][1:]]


def answers(
    first: Sequence[Recognition], per_crop: Sequence[Sequence[View]], crops: Sequence[int], more: Sequence[Recognition]
) -> list[tuple[Recognition, int]]:
    """The answer per crop and the index of the view it was read from (in the crop's
    views): its first reading (0), or for each of ``crops`` the most confident of its first
    reading and ``more`` (the readings of ``further_views``)."""
    out, start = [(r, 0) for r in first], 0
    for i in crops:
        n = len(per_crop[i]) - 1
        readings = [first[i], *more[start : start + n]]
        best = most_confident_index(readings)
        out[i] = (readings[best], best)
        start += n
    if start != len(more):
        raise ValueError(f"{len(more)} readings for {start} further views")
    return out


def merge(first: Sequence[Recognition], per_crop: Sequence[Sequence[View]], crops: Sequence[int], more: Sequence[Recognition]) -> list[Recognition]:
    """``answers`` without the views' indices."""
    return [r for r, _ in answers(first, per_crop, crops, more)]


def _read_steps(per_crop: Sequence[Sequence[View]], confident_at: float) -> Generator[list[View], list[Recognition], list[tuple[Recognition, int]]]:
    # Yields the views to read (at most twice) and is sent their readings; returns ``answers``.
    if not per_crop:
        return []
    first = yield first_views(per_crop)
    crops = unsure(first, per_crop, confident_at)
    more = (yield further_views(per_crop, crops)) if crops else []
    return answers(first, per_crop, crops, more)


def read_views(read: Callable[[list[View]], list[Recognition]], per_crop: Sequence[Sequence[View]], confident_at: float) -> list[Recognition]:
    """One answer per crop, ``read`` being called on a list of views at most twice: the
    first views, then the further views of the unsure crops."""
    steps = _read_steps(per_crop, confident_at)
    try:
        views = next(steps)
        while True:
            views = steps.send(read(views))
    except StopIteration as done:
        return [r for r, _ in done.value]


async def aread_answers(
    read: Callable[[list[View]], Awaitable[list[Recognition]]], per_crop: Sequence[Sequence[View]], confident_at: float
) -> list[tuple[Recognition, int]]:
    """``read_views`` with a coroutine ``read``, each answer with the index of the view it
    was read from (``answers``); exceptions from ``read`` propagate."""
    steps = _read_steps(per_crop, confident_at)
    try:
        views = next(steps)
        while True:
            views = steps.send(await read(views))
    except StopIteration as done:
        return done.value


def read_images(
    recognize: Callable[[torch.Tensor], list[Recognition]], images: Sequence[Image.Image], cfg: PreprocessConfig, view_cfg: ViewConfig, device: torch.device
) -> list[Recognition]:
    """One answer per PIL image: each pre-processed with the shared code path
    (``model.preprocess.views``) and read in its views as the service reads them, by
    ``recognize`` (a batch ``[B, C, H, W]`` on ``device`` → one reading per row)."""
    from .preprocess import collate, to_tensor, views

    per_image = [views(im, cfg, view_cfg) for im in images]
    return read_views(lambda vs: recognize(collate([to_tensor(v) for v in vs]).to(device)), per_image, view_cfg.confident_at)
