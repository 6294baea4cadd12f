"""Autoregressive transformer decoder over the charset, with a key/value cache."""

from __future__ import annotations

import torch
from torch import nn

from .attention import FeedForward, MultiHeadAttention
from .charset import BOS_ID, EOS_ID, PAD_ID

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

    def forward(self, x: torch.Tensor, memory_kv: KV, cache: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Whole sequence (``cache is None``, causal) or the newest position (``cache`` = [k, v], updated in place)."""
        h = self.norm1(x)
        k, v = self.self_attn.project_kv(h)
        if cache is None:
            x = x + self.drop(self.self_attn.attend(h, k, v, causal=True))
        else:
            if cache:
                k = torch.cat([cache[0], k], dim=2)
                v = torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
            x = x + self.drop(self.self_attn.attend(h, k, v))
        x = x + self.drop(self.cross_attn.attend(self.norm2(x), *memory_kv))
        return x + self.drop(self.ffn(self.norm3(x)))


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
        ``caches``: per layer ``[k, v]`` of the positions before ``start``, extended in
        place (``None``: a causal pass over the whole prefix, ``start`` 0).
        """
        x = self.drop(self.embed(tokens) + self.pos[start : start + tokens.shape[1]])
        for i, layer in enumerate(self.layers):
            x = layer(x, mem_kv[i], None if caches is None else caches[i])
        return self.head(self.norm(x))

    @torch.no_grad()
    def greedy(
        self, memory: torch.Tensor, max_len: int | None = None, use_cache: bool = True, allowed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy decoding; returns token ids and their probabilities, both ``[B, L]``.

        ``allowed`` (bool ``[B, V]``, ``Charset.token_mask`` rows) restricts each sequence to
        its tokens: the others' logits are set to −inf before the softmax, so a constrained
        reading's probabilities are renormalised over what it may say (EasyOCR's allowlist).

        Stops as soon as every sequence has produced EOS. Positions after a sequence's
        EOS hold PAD with probability 1. A sequence still running after ``max_len``
        characters is ended there with the probability the model gives EOS at that step
        (not 1), so its confidence shows the forced stop. ``use_cache=False`` recomputes the whole prefix
        at every step (reference path for tests).
        """
        max_len = min(max_len or self.max_len, self.max_len)
        b = memory.shape[0]
        mem_kv = self.memory_kv(memory)
        caches: list[list[torch.Tensor]] | None = [[] for _ in self.layers] if use_cache else None
        tokens = torch.full((b, 1), BOS_ID, dtype=torch.long, device=memory.device)
        ids, probs = [], []
        done = torch.zeros(b, dtype=torch.bool, device=memory.device)
        for t in range(max_len + 1):
            if use_cache:
                logits = self.run(tokens[:, -1:], mem_kv, start=t, caches=caches)[:, -1]
            else:
                logits = self.run(tokens, mem_kv, start=0, caches=None)[:, -1]
            logits = logits.float()
            if allowed is not None:
                logits = logits.masked_fill(~allowed, float("-inf"))
            logits[:, PAD_ID] = float("-inf")
            logits[:, BOS_ID] = float("-inf")
            dist = logits.softmax(-1)
            if t == max_len:
                # Out of room: the sequence must end here. The end token keeps the probability
                # the model gives it, so a reading cut off at max_len reads unsure instead of
                # getting an end-of-word term of 1.
                nxt = torch.full((b,), EOS_ID, dtype=torch.long, device=memory.device)
                p = dist[:, EOS_ID]
            else:
                p, nxt = dist.max(-1)
            nxt = nxt.masked_fill(done, PAD_ID)
            p = p.masked_fill(done, 1.0)
            ids.append(nxt)
            probs.append(p)
            done |= nxt == EOS_ID
            if bool(done.all()):
                break
            tokens = torch.cat([tokens, nxt.unsqueeze(1)], dim=1)
        return torch.stack(ids, 1), torch.stack(probs, 1)
