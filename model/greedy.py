"""The greedy decoding rule, stated once for both of its loops: PyTorch's
(``TransformerDecoder.greedy``) and NumPy's over the ONNX graphs (``OnnxReader.greedy``).

At each position ``t`` of ``positions(max_len)`` a reading's next token is the most probable
one it may emit: never PAD or BOS (``NEVER_EMITTED``), nor a token outside its ``allowed``
mask, the probabilities renormalised over what is left. At ``t == max_len`` it is out of
room: the token is EOS, with the probability the model gives EOS there (not 1, so a reading
cut off reads unsure). After a reading's EOS every position holds PAD with probability 1.

The functions take the array module (``numpy`` or ``torch``) as ``xp`` and use only what
both have with the same meaning, so the two loops make the same choices from the same
numbers; each loop keeps its own softmax and model call. No PyTorch import: the ONNX reader
of ``safl recognize`` runs without it.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from .charset import BOS_ID, EOS_ID, PAD_ID

#: Tokens a reading never emits: PAD is what follows its end, BOS only what starts it.
NEVER_EMITTED = [PAD_ID, BOS_ID]

#: An array of either module: ``numpy.ndarray`` or ``torch.Tensor``.
Array = Any


def positions(max_len: int) -> range:
    """The decoding positions: up to ``max_len`` characters, then room for the end token only."""
    return range(max_len + 1)


def masked(logits: Array, allowed: Array | None, xp: ModuleType) -> Array:
    """``logits`` float ``[B, V]`` with ``-inf`` for the tokens a row may not emit: those
    ``allowed`` (bool ``[B, V]``; ``None``: every token) leaves out, and ``NEVER_EMITTED``.
    Writes into ``logits`` when there is no ``allowed`` mask (callers pass a fresh array)."""
    if allowed is not None:
        logits = xp.where(allowed, logits, float("-inf"))
    logits[:, NEVER_EMITTED] = float("-inf")
    return logits


def pick(dist: Array, t: int, max_len: int, done: Array, xp: ModuleType) -> tuple[Array, Array, Array]:
    """The token each row emits at position ``t`` and its probability, from ``dist`` (the
    softmax of ``masked`` logits, float ``[B, V]``) and ``done`` (bool ``[B]``, the rows that
    have ended): int64 ``[B]``, float ``[B]`` (``dist``'s dtype), and ``done`` after it."""
    nxt = xp.argmax(dist, axis=1)
    if t == max_len:  # out of room: the end, with the probability the model gives it
        nxt = xp.full_like(nxt, EOS_ID)
        p = dist[:, EOS_ID]
    else:
        p = xp.amax(dist, axis=1)
    nxt = xp.where(done, PAD_ID, nxt)
    p = xp.where(done, 1.0, p)
    return nxt, p, done | (nxt == EOS_ID)
