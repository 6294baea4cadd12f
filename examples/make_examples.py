"""Regenerate the sample word crops of ``examples/`` (README, "Use it"): words rendered by the
training renderer (``model.training.synth.Renderer``) in font families held out of training
(``model.training.fonts.HELD_OUT_FAMILIES``), so the shipped model never saw these fonts.

    python examples/make_examples.py            # writes examples/*.png

Each example is a fixed word, render settings and seed; the PNGs are the model's input size
(128 x 32 grey), a few hundred bytes to a few KB each. Needs the training extra and the
Liberation fonts (apt-get install fonts-liberation2).
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from PIL import Image

from model.charset import DEFAULT_CHARS
from model.training import synth
from model.training.fonts import discover_fonts
from model.training.synth import Renderer

HERE = Path(__file__).resolve().parent

#: Everything random off, loose margins: the examples switch on what they show.
PLAIN = dataclasses.replace(synth.PLAIN, p_tight=0.0)

#: file name -> (word, settings switched on, seed)
EXAMPLES: dict[str, tuple[str, dict[str, float], int]] = {
    "word.png": ("Hello", {}, 1),
    "sign.png": ("EXIT", {"p_texture": 1.0, "p_perspective": 1.0, "p_noise": 1.0}, 3),
    "curved.png": ("Coffee", {"p_arc": 1.0, "p_gradient": 1.0, "p_blur": 1.0}, 1),
    "price.png": ("Total: $14.99", {}, 1),  # a label and its value: read with the space since f069287fb30f
}


class _Word:
    """A text sampler that always draws one word."""

    def __init__(self, word: str) -> None:
        self.word = word

    def sample(self, rng: random.Random) -> str:
        return self.word


def render(word: str, flags: dict[str, float], seed: int) -> Image.Image:
    """``word`` drawn by the training renderer in a held-out font, as a grey 128 x 32 image.
    Raises ``RuntimeError`` when no held-out font is installed."""
    faces = discover_fonts(DEFAULT_CHARS, families="held_out")
    if not faces:
        raise RuntimeError("no held-out font installed: apt-get install fonts-liberation2")
    renderer = Renderer(dataclasses.replace(PLAIN, seed=seed, **flags), faces)
    renderer.sampler = _Word(word)
    image, text = renderer.render(0)
    assert text == word, (text, word)
    return Image.fromarray(image)


def main() -> None:
    for name, (word, flags, seed) in EXAMPLES.items():
        render(word, flags, seed).save(HERE / name, optimize=True)
        print(HERE / name, (HERE / name).stat().st_size, "bytes")


if __name__ == "__main__":
    main()
