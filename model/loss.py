"""Sequence focal loss (SAFL's loss) and its cross-entropy special case."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .charset import PAD_ID


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0, ignore_index: int = PAD_ID) -> torch.Tensor:
    """Mean of ``-(1 - p_t)^gamma * log p_t`` over the non-padding target tokens.

    ``logits`` [B, T, V], ``targets`` [B, T]. With ``gamma == 0`` this is exactly the
    token-level cross entropy; larger ``gamma`` down-weights tokens the model already
    predicts confidently, which shifts the gradient toward rare characters and words.
    """
    if gamma < 0:
        raise ValueError("gamma must be >= 0")
    logp = F.log_softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)
    flat = targets.reshape(-1)
    mask = flat != ignore_index
    logp_t = logp.gather(1, flat.clamp(min=0).unsqueeze(1)).squeeze(1)[mask]
    if gamma == 0:
        return -logp_t.mean()
    weight = (1.0 - logp_t.exp()).clamp(min=0.0).pow(gamma)
    return -(weight * logp_t).mean()


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str = "focal", gamma: float = 2.0) -> torch.Tensor:
    """The training loss by name: ``"focal"`` (with ``gamma``) or ``"ce"``."""
    if kind == "focal":
        return focal_loss(logits, targets, gamma)
    if kind == "ce":
        return focal_loss(logits, targets, 0.0)
    raise ValueError(f"unknown loss {kind!r}: expected 'focal' or 'ce'")
