"""The SAFL network (arXiv 2201.00132): rectify → encode → decode, and its config."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from PIL import Image
from torch import nn

from .charset import DEFAULT_CHARS, Charset
from .decode import TransformerDecoder
from .encode import SATRNEncoder
from .preprocess import PreprocessConfig, ViewConfig
from .reading import Recognition, read_images
from .rectify import TPSRectifier
from .search import DecodeOptions, per_crop, read


@dataclass(frozen=True)
class SAFLConfig:
    """Every hyper-parameter of the network. ``preset(name)`` gives the named ones."""

    preset: str = "small"
    height: int = 32
    width: int = 128
    channels: int = 1
    charset: str = DEFAULT_CHARS
    max_len: int = 25
    d_model: int = 192
    heads: int = 4
    enc_layers: int = 3
    dec_layers: int = 2
    ffn_mult: int = 2
    grid_h: int = 2
    # Position-table steps (token rows, columns): below 1 after model.training.grow made the grid
    # longer, so the grown grid reads the positions the model was trained on (encode.sinusoid).
    pos_step_h: float = 1.0
    pos_step_w: float = 1.0
    locality_ffn: bool = False
    use_tps: bool = True
    tps_points: int = 20
    tps_max_offset: float = 0.75  # bound on fiducial-point (y, or all with tps_monotone=False) offsets; 0 with tps_monotone=False = legacy unbounded points
    tps_monotone: bool = True  # points that cannot fold (model.rectify.monotone_points); False before format 3
    #: The localisation net's feature map is averaged into tps_loc_h x tps_loc_w cells before
    #: its fully connected layers. 1 x 1 (every checkpoint up to 112a46b67e37) keeps no layout:
    #: where along the word a feature lies is lost, and a curved line's points need it.
    tps_loc_h: int = 1
    tps_loc_w: int = 1
    dropout: float = 0.0

    @property
    def preprocess(self) -> PreprocessConfig:
        """Input geometry, shared with the pre-processing code."""
        return PreprocessConfig(self.height, self.width, self.channels)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (stored in checkpoints)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAFLConfig:
        """Inverse of ``to_dict``; unknown keys are an error, not silently dropped."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown SAFLConfig keys: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> SAFLConfig:
        """A named preset, optionally with some fields changed."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)


PRESETS: dict[str, SAFLConfig] = {
    # For tests: trains in seconds on a CPU.
    "tiny": SAFLConfig(preset="tiny", d_model=64, heads=2, enc_layers=1, dec_layers=1, grid_h=1, dropout=0.0),
    # For 2-core CPU training: the stride-2 stem and a 2x32 token grid keep a step cheap.
    "small": SAFLConfig(preset="small"),
    # Close to the paper (SATRN-sized encoder, H/4 x W/4 grid, locality-aware FFN): for GPUs.
    "base": SAFLConfig(preset="base", d_model=512, heads=8, enc_layers=9, dec_layers=3, ffn_mult=4, grid_h=8, locality_ffn=True),
}


class SAFL(nn.Module):
    """Self-attention text recogniser with a TPS rectifier, trained with focal loss."""

    def __init__(self, config: SAFLConfig) -> None:
        super().__init__()
        self.config = config
        config.preprocess  # noqa: B018 - validates the input geometry (channels 1 or 3, at least 8x8) up front
        self.charset = Charset(config.charset)
        c = config
        self.rectifier = (
            TPSRectifier(c.channels, c.height, c.width, c.tps_points, c.tps_max_offset, c.tps_monotone, (c.tps_loc_h, c.tps_loc_w)) if c.use_tps else None
        )
        self.encoder = SATRNEncoder(
            c.channels,
            c.height,
            c.width,
            c.d_model,
            c.heads,
            c.enc_layers,
            c.d_model * c.ffn_mult,
            c.grid_h,
            c.locality_ffn,
            c.dropout,
            (c.pos_step_h, c.pos_step_w),
        )
        self.decoder = TransformerDecoder(self.charset.vocab_size, c.d_model, c.heads, c.dec_layers, c.d_model * c.ffn_mult, c.max_len, c.dropout)

    @torch.no_grad()
    def rectify(self, images: torch.Tensor) -> torch.Tensor:
        """What the encoder reads: the TPS rectifier's output ``[B, C, H, W]`` for
        preprocessed images of the same shape (the images themselves without a rectifier);
        ``model.preprocess.to_pixels`` turns it into pixels."""
        if self.rectifier is None:
            return images
        was_training = self.training
        self.eval()
        try:
            return self.rectifier(images)
        finally:
            self.train(was_training)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` (normalised) → memory tokens."""
        if self.rectifier is not None:
            images = self.rectifier(images)
        return self.encoder(images)

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor, return_points: bool = False, detach_points: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced logits for decoder input ``tokens`` (BOS + characters); with
        ``return_points``, also the rectifier's fiducial points ``[B, F, 2]`` (one pass of
        the localisation net serves both; raises ``ValueError`` without a rectifier), and with
        ``detach_points`` the logits' gradient stops at the warp, so a loss on the logits
        leaves the rectifier alone (a loss on the returned points still teaches it)."""
        if not return_points:
            return self.decoder(tokens, self.encode(images))
        if self.rectifier is None:
            raise ValueError("this model has no rectifier: it predicts no fiducial points")
        points = self.rectifier.points(images)
        warped = self.rectifier.warp(images, points.detach() if detach_points else points)
        return self.decoder(tokens, self.encoder(warped)), points

    @torch.no_grad()
    def generate(self, images: torch.Tensor, use_cache: bool = True, amp_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy token ids and probabilities ``[B, L]`` for a batch of images."""
        ctx = torch.autocast(images.device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
        with ctx:
            return self.decoder.greedy(self.encode(images), use_cache=use_cache)

    @torch.no_grad()
    def recognize(
        self, images: torch.Tensor, amp_dtype: torch.dtype | None = None, options: DecodeOptions | Sequence[DecodeOptions] | None = None
    ) -> list[Recognition]:
        """Recognise a batch of preprocessed images ``[B, C, H, W]`` (see ``model.preprocess``).

        ``options``: how to read them (``model.search.DecodeOptions``: allowlist, lexicon,
        ``top_k``), one for all or one per image; ``None`` reads greedily. Raises
        ``ValueError`` if a sequence of options is not one per image.
        """
        was_training = self.training
        self.eval()
        ctx = torch.autocast(images.device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
        try:
            with ctx:
                if options is None:
                    return self.charset.decode_batch(*self.decoder.greedy(self.encode(images)))
                return read(self.decoder, self.charset, self.encode(images), per_crop(options, images.shape[0]))
        finally:
            self.train(was_training)

    def recognize_images(self, images: list[Image.Image], view_cfg: ViewConfig = ViewConfig()) -> list[Recognition]:
        """Recognise PIL images, pre-processed here with the shared code path and read in
        the views ``view_cfg`` asks for, as the service reads them (``model.reading``)."""
        return read_images(self.recognize, images, self.config.preprocess, view_cfg, next(self.parameters()).device)

    def num_parameters(self) -> int:
        """Trainable parameter count."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
