"""The model's own probability of a given text, by one teacher-forced decoder pass.

An allowlist or blocklist renormalises the decoder's probabilities over what a reading may
say, so a crop of ``EXIT`` read with digits only answers ``""`` at 0.99: sure among the
readings left, not that it is right. Its calibrated confidence is made from what the
unconstrained model gives the text it was forced to (``model.calibration.calibrate``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from . import greedy as greedy_rule
from .charset import PAD_ID
from .reading import Recognition
from .safl import SAFL


@torch.no_grad()
def text_probabilities(model: SAFL, images: torch.Tensor, texts: Sequence[str]) -> list[float]:
    """The unconstrained model's probability of each text (its characters, then the end
    token) for preprocessed ``images`` ``[B, C, H, W]``, one text per row: the product of
    the probabilities greedy decoding would give along that path (PAD and BOS excluded from
    the softmax, as there). Raises ``KeyError`` for a character outside the charset."""
    if not texts:
        return []
    inputs, targets = model.charset.encode_batch(list(texts))
    memory = model.encode(images)
    logits = model.decoder(inputs.to(memory.device), memory).float()
    logits[..., greedy_rule.NEVER_EMITTED] = float("-inf")
    logp = logits.log_softmax(-1).gather(-1, targets.to(memory.device).clamp(min=0)[..., None]).squeeze(-1)
    logp = logp.masked_fill(targets.to(memory.device) == PAD_ID, 0.0)
    return logp.sum(-1).exp().cpu().tolist()


def with_model_probability(model: SAFL, images: torch.Tensor, readings: Sequence[Recognition], constrained: Sequence[bool]) -> list[Recognition]:
    """``readings`` of ``images`` (one per row), those marked ``constrained`` (renormalised
    over an allowlist or blocklist) given their ``model_probability``."""
    rows = [i for i, c in enumerate(constrained) if c]
    out = list(readings)
    if rows:
        probs = text_probabilities(model, images[rows], [readings[i].text for i in rows])
        for i, p in zip(rows, probs, strict=True):
            out[i] = dataclasses.replace(out[i], model_probability=p)
    return out
