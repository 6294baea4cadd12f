"""Helpers for the model and training tests: a tiny SAFL that has really learnt a few words.

Nothing here replaces the model: ``memorise`` trains the real ``tiny`` preset with the
real training pieces (``Charset.encode_batch``, ``focal_loss``, AdamW) on rendered words.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from conftest import render_word

from model import SAFL, SAFLConfig
from model.loss import focal_loss
from model.preprocess import collate, preprocess

WORDS = ["cat", "house", "TREE", "river42", "Moon", "zebra"]


@dataclass
class Memorised:
    """A trained tiny model, the batch it learnt and how the training went."""

    model: SAFL
    words: list[str]
    images: torch.Tensor
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    matched_at: int | None = None


def memorise(words: list[str] = WORDS, max_steps: int = 300, lr: float = 3e-3, seed: int = 0, check_every: int = 10, use_tps: bool = True) -> Memorised:
    """Train ``tiny`` on one fixed batch of rendered ``words`` (no augmentation).

    Stops ``check_every`` steps after greedy decoding first reproduces every label, so
    the returned model is solidly past the point where it reads the batch correctly.
    """
    torch.manual_seed(seed)
    model = SAFL(SAFLConfig.from_preset("tiny", use_tps=use_tps)).train()
    images = collate([preprocess(render_word(w), model.config.preprocess) for w in words])
    inp, tgt = model.charset.encode_batch(words)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    result = Memorised(model, list(words), images)
    for step in range(1, max_steps + 1):
        loss = focal_loss(model(images, inp), tgt, gamma=2.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        result.losses.append(float(loss.detach()))
        result.steps = step
        if step % check_every == 0:
            if result.matched_at is not None:
                break
            if [r.text for r in model.recognize(images)] == list(words):
                result.matched_at = step
    model.eval()
    return result
