"""Shared fixtures: a real (untrained) tiny SAFL checkpoint and rendered word images.

Tests run on 1 thread so they do not starve a training run on the same 2 cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from model import SAFL, SAFLConfig, save_checkpoint

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def onnx_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ONNX graph cache (``model.onnx_cache``) of this test session, not the user's:
    ``SAFL_CACHE_DIR`` for the session and the servers it starts (``service_support.subprocess_env``)."""
    import os

    folder = tmp_path_factory.mktemp("onnx-cache")
    os.environ["SAFL_CACHE_DIR"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def any_faces() -> list:
    """Every installed font face that draws the default charset, of any family (CI: DejaVu
    only; the text benchmarks themselves ask for held-out families); skips without fonts."""
    from model.charset import DEFAULT_CHARS
    from model.training.fonts import discover_fonts

    found = discover_fonts(DEFAULT_CHARS, families="all")
    if not found:
        pytest.skip("no fonts installed")
    return found


def render_word(text: str, size: tuple[int, int] = (128, 32), mode: str = "L") -> Image.Image:
    """A plain black-on-white word image drawn with Pillow's built-in font."""
    img = Image.new("L", size, 255)
    font = ImageFont.load_default(size=max(10, size[1] - 8))
    ImageDraw.Draw(img).text((4, 2), text, fill=0, font=font)
    return img.convert(mode)


def random_words(n: int, seed: int) -> list[str]:
    """``n`` made-up lowercase words of 2 to 6 letters, the same for the same seed."""
    import random

    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 6))) for _ in range(n)]


def write_shards(folder: Path, words: list[str], shard_size: int = 32) -> Path:
    """A shard folder in the ``safl synth`` layout, each word drawn with Pillow's font."""
    import numpy as np

    from model.preprocess import PreprocessConfig, resize

    imgs = np.stack([resize(render_word(w), PreprocessConfig()) for w in words])
    for k, start in enumerate(range(0, len(words), shard_size)):
        np.save(folder / f"shard-{k:05d}.npy", imgs[start : start + shard_size])
        (folder / f"shard-{k:05d}.txt").write_text("\n".join(words[start : start + shard_size]) + "\n")
    return folder


@pytest.fixture(scope="session")
def tiny_model() -> SAFL:
    """An untrained ``tiny`` SAFL with fixed weights (seed 0), in eval mode."""
    torch.manual_seed(0)
    return SAFL(SAFLConfig.from_preset("tiny")).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_model: SAFL) -> Path:
    """``tiny_model`` saved as a real safetensors + JSON checkpoint; returns the .safetensors path."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(tiny_model, path, name="safl-tiny")
    return path


@pytest.fixture(scope="session")
def memorised_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A ``tiny`` SAFL that has really learnt a few rendered words (``model_support.memorise``),
    saved as a checkpoint; returns its path and the words."""
    from model_support import memorise

    m = memorise()
    path = tmp_path_factory.mktemp("memorised") / "memorised.safetensors"
    save_checkpoint(m.model, path, name="safl-memorised")
    return path, m.words


@pytest.fixture(scope="session")
def memorised_checkpoint_without_tps(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """``memorised_checkpoint`` without a rectifier, for the tests of turning tall crops: a toy
    rectifier fit to six upright crops reads a sideways crop as one of them with ~0.6
    confidence, where a real model reads it unsure (then the turned views decide)."""
    from model_support import memorise

    m = memorise(use_tps=False)
    path = tmp_path_factory.mktemp("memorised-no-tps") / "memorised.safetensors"
    save_checkpoint(m.model, path, name="safl-memorised")
    return path, m.words
