"""Autoregressive transformer decoder over the charset, with a key/value cache."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import greedy as greedy_rule
from .attention import FeedForward, MultiHeadAttention
from .charset import BOS_ID

KV = tuple[torch.Tensor, torch.Tensor]


class DecoderLayer(nn.Module):
    """Pre-norm layer: causal self-attention, cross-attention to the image, MLP."""

    def __init__(self, d_model: int, heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model, heads, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.cross_attn = MultiHeadAttention(d_model, heads, dropout)
        self.norm3 = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, d_ff, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory_kv: KV, past: KV | None = None, causal: bool = False) -> tuple[torch.Tensor, KV]:
        """The layer on ``x`` ``[B, T, D]``: its output ``[B, T, D]`` and the self-attention
        keys/values ``[B, heads, t + T, head_dim]`` of every position so far.

        ``past``: the keys/values of the ``t`` positions before ``x`` (``None``: none), which
        ``x`` attends to with itself; ``causal``: each position of ``x`` attends only to those
        up to it (teacher forcing over a whole sequence). The one definition of a decoder
        step: ``TransformerDecoder.run`` (the K/V cache of greedy and beam search) and the
        exported graph (``model.onnx_export.DecoderStepGraph``) both call it.
        """
        h = self.norm1(x)
        k, v = self.self_attn.project_kv(h)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        x = x + self.drop(self.self_attn.attend(h, k, v, causal=causal))
        x = x + self.drop(self.cross_attn.attend(self.norm2(x), *memory_kv))
        return x + self.drop(self.ffn(self.norm3(x))), (k, v)


#: The parameters (of ``SAFL``'s state dict) with one row per token id: what a change of charset
#: re-indexes (``model.training.train.with_charset``, ``model.training.average``).
TOKEN_ROW_PARAMS = ("decoder.embed.weight", "decoder.head.weight", "decoder.head.bias")


class TransformerDecoder(nn.Module):
    """Predicts the next character from the image memory and the characters so far."""

    def __init__(self, vocab_size: int, d_model: int, heads: int, layers: int, d_ff: int, max_len: int, dropout: float) -> None:
        super().__init__()
        self.max_len = max_len
        # No sqrt(d) scaling of the embedding: with PyTorch's default init it left the
        # decoder stuck at 0 % accuracy after 1.5k steps in CPU trials; unscaled, it learnt.
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Parameter(torch.zeros(max_len + 1, d_model))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.layers = nn.ModuleList(DecoderLayer(d_model, heads, d_ff, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.drop = nn.Dropout(dropout)

    def memory_kv(self, memory: torch.Tensor) -> list[KV]:
        """Cross-attention keys/values of the image memory, computed once per image."""
        return [layer.cross_attn.project_kv(memory) for layer in self.layers]

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``[B, T, V]`` for input tokens ``[B, T]`` (BOS first)."""
        return self.run(tokens, self.memory_kv(memory), start=0, caches=None)

    def run(self, tokens: torch.Tensor, mem_kv: list[KV], start: int, caches: list[list[torch.Tensor]] | None) -> torch.Tensor:
        """Logits ``[B, T, V]`` for ``tokens`` ``[B, T]`` at positions ``start..start+T-1``.

        ``mem_kv``: ``memory_kv`` of the image memory (rows may be repeated per beam).
        ``caches``: per layer ``[k, v]`` of the positions before ``start`` (``[]`` at the
        first step), replaced in place by ``[k, v]`` with these positions added (``None``: a
        causal pass over the whole prefix, ``start`` 0).
        """
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        if caches is None:
            logits, _ = self.step(tokens, positions, mem_kv, [None] * len(self.layers), causal=True)
            return logits
        logits, new = self.step(tokens, positions, mem_kv, [(c[0], c[1]) if c else None for c in caches])
        for cache, kv in zip(caches, new, strict=True):
            cache[:] = kv
        return logits

    def step(
        self, tokens: torch.Tensor, positions: torch.Tensor, mem_kv: Sequence[KV], past: Sequence[KV | None], causal: bool = False
    ) -> tuple[torch.Tensor, list[KV]]:
        """Logits ``[B, T, V]`` for ``tokens`` int64 ``[B, T]`` at ``positions`` int64 ``[T]``,
        and per layer the keys/values of every position so far (``DecoderLayer.forward``;
        ``past``: per layer those before ``positions``, or ``None``)."""
        x = self.drop(self.embed(tokens) + self.pos.index_select(0, positions))
        new: list[KV] = []
        for layer, kv, before in zip(self.layers, mem_kv, past, strict=True):
            x, now = layer(x, kv, before, causal=causal)
            new.append(now)
        return self.head(self.norm(x)), new

    @torch.no_grad()
    def greedy(
        self, memory: torch.Tensor, max_len: int | None = None, use_cache: bool = True, allowed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy decoding (the rule of ``model.greedy``); returns token ids int64 and their
        probabilities float32, both ``[B, L]`` with ``L`` ≤ ``max_len + 1``.

        ``allowed`` (bool ``[B, V]``, ``Charset.token_mask`` rows) restricts each sequence to
        its tokens: their probabilities are renormalised over them (EasyOCR's allowlist).
        Stops as soon as every sequence has produced EOS; ``max_len`` (at most the model's)
        caps the characters. ``use_cache=False`` recomputes the whole prefix at every step
        (reference path for tests).
        """
        max_len = min(max_len or self.max_len, self.max_len)
        b = memory.shape[0]
        mem_kv = self.memory_kv(memory)
        caches: list[list[torch.Tensor]] | None = [[] for _ in self.layers] if use_cache else None
        tokens = torch.full((b, 1), BOS_ID, dtype=torch.long, device=memory.device)
        ids, probs = [], []
        done = torch.zeros(b, dtype=torch.bool, device=memory.device)
        for t in greedy_rule.positions(max_len):
            if use_cache:
                logits = self.run(tokens[:, -1:], mem_kv, start=t, caches=caches)[:, -1]
            else:
                logits = self.run(tokens, mem_kv, start=0, caches=None)[:, -1]
            dist = greedy_rule.masked(logits.float(), allowed, torch).softmax(-1)
            nxt, p, done = greedy_rule.pick(dist, t, max_len, done, torch)
            ids.append(nxt)
            probs.append(p)
            if bool(done.all()):
                break
            tokens = torch.cat([tokens, nxt.unsqueeze(1)], dim=1)
        return torch.stack(ids, 1), torch.stack(probs, 1)
