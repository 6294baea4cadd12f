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


def point_loss(predicted: torch.Tensor, target: torch.Tensor, beta: float = 0.05) -> torch.Tensor:
    """Smooth L1 (Huber) distance between predicted and target fiducial points, the
    rectifier's auxiliary loss. ``predicted`` and ``target`` ``[B, F, 2]`` in normalised
    coordinates; a crop whose target is NaN (no rendered geometry: a real crop) adds
    nothing. The mean over the crops that have one, and a zero that still carries the
    graph when none has. ``beta``: where the loss turns from quadratic to linear (2.5 % of
    the crop's half-width)."""
    known = ~torch.isnan(target).flatten(1).any(dim=1)
    if not bool(known.any()):
        return predicted.sum() * 0.0
    return F.smooth_l1_loss(predicted[known].float(), target[known].float(), beta=beta)


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str = "focal", gamma: float = 2.0) -> torch.Tensor:
    """The training loss by name: ``"focal"`` (with ``gamma``) or ``"ce"``."""
    if kind == "focal":
        return focal_loss(logits, targets, gamma)
    if kind == "ce":
        return focal_loss(logits, targets, 0.0)
    raise ValueError(f"unknown loss {kind!r}: expected 'focal' or 'ce'")


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Knowledge distillation's soft-target term (Hinton et al. 2015, arXiv 1503.02531; used
    against forgetting as in Learning without Forgetting, Li & Hoiem 2016, arXiv 1606.09282):
    the mean over the positions in ``mask`` of KL(teacher ‖ student) of the next-token
    distributions, at temperature 1.

    ``student`` ``[B, T, Vs]`` and ``teacher`` ``[B, T, Vt]`` logits of one teacher-forced
    batch; ``ids`` ``[Vt]`` int64, each teacher token's id in the student's vocabulary
    (``model.charset.token_ids``: the teacher's charset nests in the student's); ``mask``
    ``[B, T]`` bool. A student token the teacher lacks (a new character) has teacher probability
    0, so the mass the student gives it counts against it. A zero that still carries the graph
    when ``mask`` is empty."""
    if not bool(mask.any()):
        return student.sum() * 0.0
    s = F.log_softmax(student.float()[mask], dim=-1)[:, ids]
    t = F.log_softmax(teacher.float()[mask], dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()
