"""The validation / fine-tune split of a labelled folder: the one home of its rule and defaults.

Real STR training folders list the crops of one scene image next to each other, and
common words recur across scenes (IC15 train holds ``SALE`` 137 times). A shuffled
crop-level split puts crops of one scene, and crops of one word, on both sides, which
overstated validation accuracy by up to 10 points against the held-out test sets.
So the split is made of

1. **contiguous blocks** of ``block`` crops in source order (fewer in a small folder,
   so that there are at least ten blocks) (a scene's crops stay on one
   side): a seeded draw of whole blocks forms the validation part, ``val_fraction`` of
   the blocks;
2. **no shared word**: a crop whose word (``word_key``: as scored, so ``SALE,`` is
   ``sale``) occurs in the validation part is left out of the fine-tune part. Validation keeps every crop of its blocks, so it stays
   a sample of the folder's own distribution, common words included.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from .protocol import normalize_36


@dataclass(frozen=True)
class SplitConfig:
    """How a labelled folder is split. The defaults are the project's split."""

    val_fraction: float = 0.3  #: share of the blocks that form the validation part
    seed: int = 0  #: seed of the block draw
    block: int = 50  #: crops per contiguous block, in source order

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction <= 1.0:
            raise ValueError(f"val_fraction must be in [0, 1], got {self.val_fraction}")
        if self.block < 1:
            raise ValueError(f"block must be at least 1, got {self.block}")


DEFAULT_SPLIT = SplitConfig()
MIN_BLOCKS = 10
#: The part to compare checkpoints on while the shipped model is of the legacy lineage (it
#: fine-tuned on most of today's validation part): ship, compare and bench/peers default to it.
FAIR_PART = "val-unseen"
#: The parts of a labelled folder (``part_indices``).
PARTS = ("val", "train", "all", "val-unseen")


def word_key(label: str) -> str:
    """The form in which two labels count as the same word: as scored (``normalize_36``:
    ``SALE,`` and ``sale`` are one word), or case-folded when nothing of it is scored."""
    # fold=False: the key as it was when the split was drawn, so no crop changes part.
    return normalize_36(label, fold=False) or label.casefold()


def block_size(n: int, cfg: SplitConfig = DEFAULT_SPLIT) -> int:
    """Crops per block for a folder of ``n`` crops: ``cfg.block``, or less so that there are
    at least ``MIN_BLOCKS`` blocks (a 7-crop folder still gets a validation part)."""
    return max(1, min(cfg.block, n // MIN_BLOCKS))


def split_indices(labels: Sequence[str], cfg: SplitConfig = DEFAULT_SPLIT) -> tuple[list[int], list[int]]:
    """``(validation, fine-tune)`` indices of the crops with these ``labels``, in source order.

    Deterministic for a given ``cfg``. The two parts never share a crop, a block or a word
    (``word_key``); crops left out of both are fine-tune crops whose word is also a
    validation word.
    """
    n = len(labels)
    block = block_size(n, cfg)
    n_blocks = -(-n // block)
    order = list(range(n_blocks))
    random.Random(cfg.seed).shuffle(order)
    val_blocks = set(order[: int(round(n_blocks * cfg.val_fraction))])
    val = [i for i in range(n) if i // block in val_blocks]
    val_words = {word_key(labels[i]) for i in val}
    train = [i for i in range(n) if i // block not in val_blocks and word_key(labels[i]) not in val_words]
    return val, train


def check_part(part: str) -> str:
    """``part`` if it is one of ``PARTS``; raises ``ValueError`` naming them otherwise."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}: expected one of {', '.join(PARTS)}")
    return part


def part_indices(labels: Sequence[str], part: str, cfg: SplitConfig = DEFAULT_SPLIT) -> list[int]:
    """Indices, in source order, of the crops with these ``labels`` that form ``part``:
    ``"val"`` or ``"train"`` (the fine-tune part) of ``split_indices``, ``"val-unseen"``
    (``unseen_val_indices``) or ``"all"``. Raises ``ValueError`` for another ``part``."""
    if check_part(part) == "all":
        return list(range(len(labels)))
    if part == "val-unseen":
        return unseen_val_indices(labels, cfg)
    val, train = split_indices(labels, cfg)
    return val if part == "val" else train


def legacy_split_indices(n: int, val_fraction: float = 0.3, seed: int = 0) -> tuple[list[int], list[int]]:
    """``(validation, fine-tune)`` of the crop-level shuffle used until 2026-11-30.

    Every checkpoint up to ``safl-small@a659eaef27c4``, and every model warm-started from
    one, fine-tuned on its fine-tune part. Kept only to find the crops such a model never
    saw (``unseen_val_indices``); never split with it.
    """
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = int(round(n * val_fraction))
    return sorted(order[:k]), sorted(order[k:])


def unseen_val_indices(labels: Sequence[str], cfg: SplitConfig = DEFAULT_SPLIT) -> list[int]:
    """The validation crops (``split_indices``) that the legacy fine-tune part held neither as a
    crop nor as a label: the only fair ground to compare a model of the legacy lineage with
    one trained on the current split (part ``"val-unseen"``)."""
    val, _ = split_indices(labels, cfg)
    legacy_val, legacy_train = legacy_split_indices(len(labels))
    seen_words = {word_key(labels[i]) for i in legacy_train}
    legacy_val_set = set(legacy_val)
    return [i for i in val if i in legacy_val_set and word_key(labels[i]) not in seen_words]
