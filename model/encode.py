"""SATRN-style encoder: a shallow CNN stem, adaptive 2D positional encoding, and
transformer layers over the 2D token grid."""

from __future__ import annotations

import math

import torch
from torch import nn

from .attention import FeedForward, MultiHeadAttention


def sinusoid(length: int, dim: int, step: float = 1.0) -> torch.Tensor:
    """Sinusoidal position table ``[length, dim]`` (float32) for positions ``0, step, 2*step, ...``.

    ``step`` below 1 is position interpolation (ViT, Dosovitskiy et al. 2021, section 3.2):
    a grid grown ``k`` times longer with ``step = 1/k`` spans the positions the model was
    trained on instead of running past them.
    """
    pos = torch.arange(length, dtype=torch.float32).unsqueeze(1) * step
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)
    return table


class ShallowStem(nn.Module):
    """Two stride-2 convs then a conv to ``d_model`` and a height pool to the token grid.

    The full-resolution SATRN stem dominated a CPU training step (its convs, pooling,
    batch norm and ReLU took about 60 % of a 2-core step, the transformer much less);
    striding early (here and in the TPS localisation net) cut the step by 16 % while
    the 8x32 map before the pool still sees each character at several pixels' width.
    """

    def __init__(self, in_channels: int, d_model: int, height: int, width: int, grid_h: int) -> None:
        super().__init__()
        if height % 4 or width % 4:
            raise ValueError("input height and width must be multiples of 4")
        if (height // 4) % grid_h:
            raise ValueError(f"grid_h {grid_h} must divide the stem's height {height // 4}")

        def conv(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.net = nn.Sequential(*conv(in_channels, 32, 2), *conv(32, 64, 2), *conv(64, d_model, 1), nn.MaxPool2d(kernel_size=((height // 4) // grid_h, 1)))
        self.grid = (grid_h, width // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Adaptive2DPositionalEncoding(nn.Module):
    """SATRN's A2DPE: height and width sinusoids mixed by per-image gates from the features."""

    def __init__(self, d_model: int, grid_h: int, grid_w: int, pos_step: tuple[float, float] = (1.0, 1.0)) -> None:
        super().__init__()
        self.register_buffer("pe_h", sinusoid(grid_h, d_model, pos_step[0]), persistent=False)
        self.register_buffer("pe_w", sinusoid(grid_w, d_model, pos_step[1]), persistent=False)

        def gate() -> nn.Module:
            return nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(inplace=True), nn.Linear(d_model, d_model), nn.Sigmoid())

        self.alpha = gate()
        self.beta = gate()

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        """``feat`` [B, D, H, W] → tokens [B, H*W, D] with positions added."""
        b, d, h, w = feat.shape
        pooled = feat.mean(dim=(2, 3))
        a = self.alpha(pooled)[:, None, None, :]
        c = self.beta(pooled)[:, None, None, :]
        tokens = feat.permute(0, 2, 3, 1)
        pos = a * self.pe_h[None, :, None, :] + c * self.pe_w[None, None, :, :]
        return (tokens + pos).reshape(b, h * w, d)


class LocalityFeedForward(nn.Module):
    """SATRN's locality-aware feed-forward: 1x1 conv, depthwise 3x3 conv, 1x1 conv."""

    def __init__(self, d_model: int, d_ff: int, grid: tuple[int, int], dropout: float = 0.0) -> None:
        super().__init__()
        self.grid = grid
        self.net = nn.Sequential(
            nn.Conv2d(d_model, d_ff, 1),
            nn.GELU(),
            nn.Conv2d(d_ff, d_ff, 3, padding=1, groups=d_ff),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Conv2d(d_ff, d_model, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h, w = self.grid
        y = self.net(x.transpose(1, 2).reshape(b, d, h, w))
        return y.reshape(b, d, n).transpose(1, 2)


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer (pre-norm trains stably without a long warm-up)."""

    def __init__(self, d_model: int, heads: int, d_ff: int, grid: tuple[int, int], locality_ffn: bool, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, heads, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = LocalityFeedForward(d_model, d_ff, grid, dropout) if locality_ffn else FeedForward(d_model, d_ff, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.drop(self.attn(h, h))
        return x + self.drop(self.ffn(self.norm2(x)))


class SATRNEncoder(nn.Module):
    """Image ``[B, C, H, W]`` → memory tokens ``[B, grid_h * W/4, d_model]``."""

    def __init__(
        self,
        in_channels: int,
        height: int,
        width: int,
        d_model: int,
        heads: int,
        layers: int,
        d_ff: int,
        grid_h: int,
        locality_ffn: bool,
        dropout: float,
        pos_step: tuple[float, float] = (1.0, 1.0),
    ) -> None:
        super().__init__()
        self.stem = ShallowStem(in_channels, d_model, height, width, grid_h)
        grid = self.stem.grid
        self.pos = Adaptive2DPositionalEncoding(d_model, *grid, pos_step)
        self.layers = nn.ModuleList(EncoderLayer(d_model, heads, d_ff, grid, locality_ffn, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos(self.stem(x))
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)
