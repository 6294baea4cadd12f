"""Colours for the synthetic renderer and the coloured clean-text benchmark.

A grey reader sees a crop's luma only (ITU-R 601, ``0.299 R + 0.587 G + 0.114 B``, what
``PIL.Image.convert("L")`` computes), so text whose colour differs from its background in
hue and saturation but hardly in luma (yellow on a yellowish wall, red on dark red, pink on
white, blue on grey) is all but invisible to it. A colour model has to be taught that
contrast: ``weak_luma_pair`` draws such pairs, ``tinted`` colours an ordinary grey level
without moving its luma (so a colour crop in grey is the grey renderer's crop), and
``colourise`` paints a grey background (texture, gradient, blotches) in a colour.

Colours are ``(r, g, b)`` tuples of ints in 0-255; every draw comes from the ``random.Random``
passed in, so a seed gives the same colours on every machine.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

#: ITU-R 601 luma weights of R, G, B (they sum to 1).
LUMA = np.array([0.299, 0.587, 0.114])

RGB = tuple[int, int, int]

#: A weak-luma pair's text and background differ by at most this many luma levels ...
WEAK_LUMA_GAP = 24.0
#: ... and by at least this much chroma (``chroma_distance``): clearly different colours.
STRONG_CHROMA = 90.0

#: Known weak-luma pairs (text, background), the fallback when drawing finds none: yellow on
#: yellowish, red on dark red, pink on white, blue on grey, green on red.
CLASSIC_PAIRS: tuple[tuple[RGB, RGB], ...] = (
    ((240, 200, 20), (205, 205, 160)),
    ((215, 30, 30), (120, 40, 20)),
    ((255, 105, 180), (205, 205, 205)),
    ((40, 110, 255), (120, 120, 120)),
    ((20, 150, 60), (190, 40, 40)),
)


def luma(rgb: RGB | np.ndarray) -> float:
    """The ITU-R 601 luma of a colour, in grey levels (float, not rounded)."""
    return float(np.asarray(rgb, dtype=np.float64) @ LUMA)


def chroma_distance(a: RGB, b: RGB) -> float:
    """How far apart two colours are once their luma is taken away: the Euclidean distance
    of ``colour - luma(colour)`` in RGB levels (0 for two greys, ~300 for pure red vs cyan)."""
    ca, cb = (np.asarray(c, dtype=np.float64) - luma(c) for c in (a, b))
    return float(np.linalg.norm(ca - cb))


def with_luma(rgb: np.ndarray | RGB, level: float) -> RGB:
    """``rgb`` shifted along the grey axis (the same added to R, G and B) until its luma is
    ``level``, clipped to 0-255: the hue is kept where the gamut allows (near black or white
    little chroma fits, and the result is nearly grey)."""
    c = np.asarray(rgb, dtype=np.float64)
    for _ in range(4):  # clipping one channel lowers the luma gained; a few rounds converge
        c = np.clip(c + (level - c @ LUMA), 0, 255)
    return _ints(c)


def _ints(c: np.ndarray) -> RGB:
    r, g, b = (int(round(float(v))) for v in c)
    return r, g, b


def _random_rgb(rng: random.Random) -> np.ndarray:
    return np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float64)


def tinted(level: int, rng: random.Random, p_grey: float = 0.3) -> RGB:
    """A colour of luma ``level`` (within rounding and the gamut): grey with probability
    ``p_grey``, otherwise a random hue at a random saturation. The colour of an ordinary
    crop's background, text, outline or shadow, whose luma the grey renderer chose."""
    if rng.random() < p_grey:
        return (level, level, level)
    hue = _random_rgb(rng)
    chroma = (hue - luma(hue)) * rng.uniform(0.2, 1.0)
    return with_luma(level + chroma, level)


def weak_luma_partner(background: RGB, rng: random.Random, tries: int = 40) -> RGB | None:
    """A colour within ``WEAK_LUMA_GAP`` luma levels of ``background`` and at least
    ``STRONG_CHROMA`` away from it in chroma, or ``None`` when ``tries`` draws find none
    (a background near black or white leaves little chroma to differ in)."""
    target = luma(background)
    for _ in range(tries):
        candidate = with_luma(_random_rgb(rng), target + rng.uniform(-WEAK_LUMA_GAP, WEAK_LUMA_GAP))
        if abs(luma(candidate) - target) <= WEAK_LUMA_GAP and chroma_distance(candidate, background) >= STRONG_CHROMA:
            return candidate
    return None


def weak_luma_pair(rng: random.Random) -> tuple[RGB, RGB]:
    """``(text, background)`` colours of nearly the same luma and clearly different chroma
    (``weak_luma_partner``); one of ``CLASSIC_PAIRS``, either way round, when drawing fails."""
    for _ in range(10):
        background = _ints(_random_rgb(rng))
        text = weak_luma_partner(background, rng)
        if text is not None:
            return text, background
    text, background = rng.choice(CLASSIC_PAIRS)
    return (text, background) if rng.random() < 0.5 else (background, text)


def colourise(grey: Image.Image, level: float, colour: RGB) -> Image.Image:
    """A grey image (mode ``L``) painted in ``colour``: each pixel ``colour + (grey - level)``
    on every channel, clipped, so a texture or gradient keeps its light and shade about
    ``level`` (the image's mean, say) and takes the colour's hue. Returns mode ``RGB``."""
    shade = np.asarray(grey, dtype=np.int16)[..., None] - int(round(level))
    return Image.fromarray(np.clip(shade + np.array(colour, dtype=np.int16), 0, 255).astype(np.uint8), mode="RGB")
