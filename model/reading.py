"""One answer for a crop read in several views (``model.preprocess.views``).

The crop as it is (its first view) is read first. Only a crop whose first reading is
unsure, less confident than ``ViewConfig.confident_at``, is read in its further views
too, and the most confident of all its readings is the answer. Confident first readings
are nearly always right, so this keeps the accuracy of reading every view at a fraction
of its cost (README, "Reading several views").

``read_views`` does it with a synchronous reader, ``aread_views`` with a coroutine (the
service's batcher); both drive the same steps (``first_views`` → ``unsure`` →
``further_views`` → ``merge``).
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


@dataclass(frozen=True)
class Alternative:
    """One of the k most probable readings (``top_k``): its text and probability."""

    text: str
    confidence: float


@dataclass(frozen=True)
class Recognition:
    """One recognised word.

    ``confidence`` is the product of the per-character probabilities *and* the
    probability of the end-of-word token, so it is the model's probability of the
    whole string under greedy decoding (an empty string has the EOS probability).
    ``alternatives``: with ``top_k``, the k most probable readings found by beam search,
    most probable first (the first is ``text``); empty otherwise.
    """

    text: str
    confidence: float
    char_confidences: list[float]
    alternatives: tuple[Alternative, ...] = field(default=())


def most_confident(readings: Sequence[Recognition]) -> Recognition:
    """The most confident of one crop's readings; the first (the crop as it is) on a tie."""
    if not readings:
        raise ValueError("no readings to choose from")
    return max(readings, key=lambda r: r.confidence)


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


def merge(first: Sequence[Recognition], per_crop: Sequence[Sequence[View]], crops: Sequence[int], more: Sequence[Recognition]) -> list[Recognition]:
    """The answer per crop: its first reading, or for each of ``crops`` the most
    confident of its first reading and ``more`` (the readings of ``further_views``)."""
    answers, start = list(first), 0
    for i in crops:
        n = len(per_crop[i]) - 1
        answers[i] = most_confident([first[i], *more[start : start + n]])
        start += n
    if start != len(more):
        raise ValueError(f"{len(more)} readings for {start} further views")
    return answers


def _read_steps(per_crop: Sequence[Sequence[View]], confident_at: float) -> Generator[list[View], list[Recognition], list[Recognition]]:
    # Yields the views to read (at most twice) and is sent their readings; returns the answers.
    if not per_crop:
        return []
    first = yield first_views(per_crop)
    crops = unsure(first, per_crop, confident_at)
    more = (yield further_views(per_crop, crops)) if crops else []
    return merge(first, per_crop, crops, more)


def read_views(read: Callable[[list[View]], list[Recognition]], per_crop: Sequence[Sequence[View]], confident_at: float) -> list[Recognition]:
    """One answer per crop, ``read`` being called on a list of views at most twice: the
    first views, then the further views of the unsure crops."""
    steps = _read_steps(per_crop, confident_at)
    try:
        views = next(steps)
        while True:
            views = steps.send(read(views))
    except StopIteration as done:
        return done.value


async def aread_views(read: Callable[[list[View]], Awaitable[list[Recognition]]], per_crop: Sequence[Sequence[View]], confident_at: float) -> list[Recognition]:
    """``read_views`` with a coroutine ``read``; exceptions from ``read`` propagate."""
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
