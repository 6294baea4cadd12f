"""Multi-head attention used by both the encoder and the decoder.

Written out (rather than ``nn.MultiheadAttention``) so the decoder can keep a
key/value cache during greedy decoding; the kernel is PyTorch's fused
``scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention over ``heads`` heads."""

    def __init__(self, d_model: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not divisible by heads {heads}")
        self.heads = heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, D] → [B, heads, L, D/heads]."""
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``x``, split into heads (cacheable)."""
        return self.split(self.k_proj(x)), self.split(self.v_proj(x))

    def attend(self, query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """Attend ``query`` [B, Lq, D] to pre-projected keys/values."""
        q = self.split(self.q_proj(query))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=self.dropout if self.training else 0.0)
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))

    def forward(self, query: torch.Tensor, key_value: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """Full attention of ``query`` to ``key_value``."""
        k, v = self.project_kv(key_value)
        return self.attend(query, k, v, causal=causal)


class FeedForward(nn.Module):
    """Position-wise MLP."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
