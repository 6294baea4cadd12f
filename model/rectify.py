"""Thin-plate-spline spatial transformer (RARE / ASTER) that straightens the crop.

A small localisation CNN looks at a down-sampled copy of the input and predicts
``F`` fiducial points; a TPS maps the fixed, evenly spaced target points onto them,
which defines a sampling grid for ``grid_sample``. The points are predicted as
offsets from the target points, squashed by ``tanh`` to at most ``max_offset``
(normalised units): unbounded points drifted outside the image in CPU training and
the grid then sampled only border padding (accuracy fell from 31 % to 4 % within
1,000 steps). The last layer starts at zero, so the module starts as the identity.

Bounded offsets were not enough: the GPU-trained head (``monotone=False``) learned one
nearly fixed warp whose top-edge points fold back on each other, which cut the first
letter off and smeared the right quarter of every crop. With ``monotone=True`` (the
default for new models) each edge's points are parameterised so they cannot fold: a
centre shift and a span (bounded zoom) place the edge, a softmax splits the span into
positive gaps between consecutive points, and only the y coordinates are free offsets.
At zero output this is exactly the identity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def fiducial_points(num_points: int) -> torch.Tensor:
    """``F x 2`` (x, y) points on the top and bottom border in normalised [-1, 1] coords."""
    if num_points < 4 or num_points % 2:
        raise ValueError("the number of fiducial points must be even and at least 4")
    xs = torch.linspace(-1.0, 1.0, num_points // 2)
    top = torch.stack([xs, torch.full_like(xs, -1.0)], dim=1)
    bottom = torch.stack([xs, torch.full_like(xs, 1.0)], dim=1)
    return torch.cat([top, bottom], dim=0)


def _tps_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # U(r) = r^2 log r^2, with U(0) = 0.
    d2 = torch.cdist(a, b).pow(2)
    return d2 * torch.log(d2 + 1e-9)


class TPSGridGenerator(nn.Module):
    """Sampling grid from predicted fiducial points (pre-computed TPS algebra)."""

    def __init__(self, num_points: int, out_h: int, out_w: int) -> None:
        super().__init__()
        ctrl = fiducial_points(num_points).double()
        n = num_points
        # System matrix of the TPS interpolation with an affine part.
        delta = torch.zeros(n + 3, n + 3, dtype=torch.float64)
        delta[:n, :n] = _tps_kernel(ctrl, ctrl)
        delta[:n, n] = 1.0
        delta[:n, n + 1 :] = ctrl
        delta[n, :n] = 1.0
        delta[n + 1 :, :n] = ctrl.t()
        inv_delta = torch.linalg.inv(delta)
        # Pixel-centre target grid: with align_corners=False this samples each pixel's centre,
        # which makes the identity transform exact.
        ys = (torch.arange(out_h, dtype=torch.float64) * 2 + 1) / out_h - 1
        xs = (torch.arange(out_w, dtype=torch.float64) * 2 + 1) / out_w - 1
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
        p_hat = torch.cat([_tps_kernel(grid, ctrl), torch.ones(grid.shape[0], 1, dtype=torch.float64), grid], dim=1)
        # Both matrices are constants: fold them into one (HW x F) map from points to grid.
        self.register_buffer("point_to_grid", (p_hat @ inv_delta[:, :n]).float(), persistent=False)
        self.out_h, self.out_w = out_h, out_w

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """``points`` [B, F, 2] → grid [B, H, W, 2] for ``grid_sample``."""
        grid = torch.matmul(self.point_to_grid.to(points.dtype), points)
        return grid.view(points.shape[0], self.out_h, self.out_w, 2)


#: Bounds of the monotone parameterisation (normalised units): an edge's centre moves by at
#: most MAX_SHIFT, its span is 2 * exp(±MAX_LOG_ZOOM) (about 0.7x to 1.4x the width).
MAX_SHIFT = 0.3
MAX_LOG_ZOOM = 0.35


def monotone_points(raw: torch.Tensor, num_points: int, max_offset: float) -> torch.Tensor:
    """Fiducial points that cannot fold, from the localisation head's ``[B, 2 * (F + 1)]`` output.

    Per edge (top, then bottom; ``K = F / 2`` points each) the raw values are a centre
    shift, a log-span, ``K - 1`` gap logits and ``K`` y offsets. Returns ``[B, F, 2]``
    (x, y) in normalised coordinates, x strictly increasing along each edge; all zeros
    give ``fiducial_points(F)``.
    """
    k = num_points // 2
    raw = raw.view(-1, 2, 2 * k + 1)
    centre = MAX_SHIFT * torch.tanh(raw[..., :1])
    span = 2.0 * torch.exp(MAX_LOG_ZOOM * torch.tanh(raw[..., 1:2]))
    gaps = torch.softmax(raw[..., 2 : k + 1], dim=-1)
    x = centre - span / 2 + span * torch.cat([torch.zeros_like(gaps[..., :1]), torch.cumsum(gaps, dim=-1)], dim=-1)
    edge_y = torch.tensor([-1.0, 1.0], dtype=raw.dtype, device=raw.device).view(1, 2, 1)
    y = edge_y + max_offset * torch.tanh(raw[..., k + 1 :])
    return torch.stack([x, y], dim=-1).reshape(-1, num_points, 2)


class TPSRectifier(nn.Module):
    """Localisation CNN + TPS grid + bilinear sampling; output has the input's size."""

    def __init__(
        self,
        in_channels: int,
        height: int,
        width: int,
        num_points: int = 20,
        max_offset: float = 0.75,
        monotone: bool = True,
        loc_grid: tuple[int, int] = (1, 1),
    ) -> None:
        super().__init__()
        cells = loc_grid[0] * loc_grid[1]
        # The net reads the input at half size through three stride-2 convolutions.
        fh, fw = height // 2, width // 2
        for _ in range(3):
            fh, fw = (fh + 1) // 2, (fw + 1) // 2
        if fh % loc_grid[0] or fw % loc_grid[1]:
            raise ValueError(f"the localisation grid {loc_grid[0]}x{loc_grid[1]} must divide its feature map ({fh}x{fw} for a {height}x{width} input)")
        # A fixed pooling window, not adaptive pooling to the grid: ONNX export refuses an
        # adaptive pool to anything but 1x1 on a map of symbolic size.
        pool = nn.AdaptiveAvgPool2d(1) if cells == 1 else nn.AvgPool2d((fh // loc_grid[0], fw // loc_grid[1]))

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        # Strided convs (no max-pool) keep this net a small share of a CPU training step.
        self.loc_net = nn.Sequential(
            *block(in_channels, 32), *block(32, 64), *block(64, 128), pool, nn.Flatten(), nn.Linear(128 * cells, 64), nn.ReLU(inplace=True)
        )
        self.fc = nn.Linear(64, 2 * (num_points + 1) if monotone else num_points * 2)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        if max_offset <= 0 and not monotone:
            # Legacy (checkpoint format 1): the layer predicts absolute, unbounded points.
            with torch.no_grad():
                self.fc.bias.copy_(fiducial_points(num_points).reshape(-1))
        self.register_buffer("base_points", fiducial_points(num_points), persistent=False)
        self.grid = TPSGridGenerator(num_points, height, width)
        self.num_points = num_points
        self.max_offset = max_offset
        self.monotone = monotone

    def points(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted fiducial points ``[B, F, 2]`` for a batch."""
        small = F.interpolate(x, size=(x.shape[-2] // 2, x.shape[-1] // 2), mode="bilinear", align_corners=False)
        raw = self.fc(self.loc_net(small)).float()
        if self.monotone:
            return monotone_points(raw, self.num_points, self.max_offset)
        raw = raw.view(-1, self.num_points, 2)
        if self.max_offset <= 0:
            return raw
        return self.base_points + self.max_offset * torch.tanh(raw)

    def warp(self, x: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Sample ``x`` ``[B, C, H, W]`` through the TPS defined by ``points`` ``[B, F, 2]``."""
        grid = self.grid(points)
        return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rectify a batch ``[B, C, H, W]``."""
        return self.warp(x, self.points(x))


#: How far the point targets reach past the text's ink box, as a share of the text's height:
#: glyphs overhang their box (italics, serifs) and a frame cut exactly at the box clips them.
TARGET_MARGIN_Y = 0.1
TARGET_MARGIN_X = 0.15
#: Targets stay this far inside the monotone head's bounds, where tanh still has a gradient.
_REACH = 0.95


def point_targets(edges: torch.Tensor, max_offset: float, aspect: float) -> torch.Tensor:
    """What the rectifier is taught to predict for a crop whose text edges are ``edges``.

    ``edges`` ``[B, F, 2]`` are the renderer's points (``Renderer.render_with_points``:
    the text's top edge, then its bottom edge, normalised coordinates; NaN for crops with
    no geometry, which stay NaN). The targets widen the text's band by
    ``TARGET_MARGIN_Y`` of its height above and below and lengthen each edge by
    ``TARGET_MARGIN_X`` of the height at both ends (``aspect`` = width / height of the
    input, to measure the height in x units), never past the crop's own border (there is
    nothing to read there: a band widened past it made the rectifier squeeze a tight or long
    crop into a frame wider than the image, and smear its border into the rest; clean text of
    13-25 characters fell from 86 to 72 % in ``v4-loc-c``), then move each edge into what the
    monotone head (``monotone_points``) can reach: centre within ``MAX_SHIFT``, span within
    ``exp(±MAX_LOG_ZOOM)``, y within ``max_offset`` of its border. ASTER (Shi et al. 2018,
    section 3.1) learns the same points from the recognition loss alone; taught from the
    geometry they cannot collapse into a fixed squeeze (``notes/rectifier.md``).
    """
    k = edges.shape[1] // 2
    top, bottom = edges[:, :k], edges[:, k:]
    band = bottom - top
    top, bottom = top - TARGET_MARGIN_Y * band, bottom + TARGET_MARGIN_Y * band
    height_x = band[..., 1].abs().mean(dim=1, keepdim=True) / aspect  # the text's height in x units
    out = []
    for edge, border in ((top, -1.0), (bottom, 1.0)):
        x, y = edge[..., 0], edge[..., 1]
        left = (x[:, :1] - TARGET_MARGIN_X * height_x).clamp(min=-1.0)
        right = (x[:, -1:] + TARGET_MARGIN_X * height_x).clamp(max=1.0)
        centre, span = (left + right) / 2, (right - left).clamp(min=1e-6)
        fraction = (x - x[:, :1]) / (x[:, -1:] - x[:, :1]).clamp(min=1e-3)
        centre = centre.clamp(-_REACH * MAX_SHIFT, _REACH * MAX_SHIFT)
        span = span.clamp(2 * math.exp(-_REACH * MAX_LOG_ZOOM), 2 * math.exp(_REACH * MAX_LOG_ZOOM))
        x = centre - span / 2 + span * fraction
        y = y.clamp(-1.0, 1.0).clamp(border - _REACH * max_offset, border + _REACH * max_offset)
        out.append(torch.stack([x, y], dim=-1))
    return torch.cat(out, dim=1)
