"""The one image path shared by training and serving.

Every image the model sees, a rendered synthetic crop, a real crop from a labelled
folder or an upload to the service, goes through ``canonicalize`` → ``resize`` →
``to_tensor``. Training stores the output of ``resize`` (uint8) on disk and applies
``to_tensor`` at batch time, so the pixels the model is trained on and the pixels it
serves on are produced by the same code. Nothing else in the project may resize or
normalise an image.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import ExifTags, Image, ImageOps

if TYPE_CHECKING:
    import torch

#: Background used where an image is transparent: word crops are printed matter.
_WHITE = (255, 255, 255)
_BLACK = (0, 0, 0)


def _backdrop(rgba: Image.Image) -> tuple[int, int, int]:
    """White behind dark visible pixels, black behind light ones: text on a transparent
    background keeps its contrast whatever its colour (white text composited on white
    would vanish). The visible pixels' mean luma (ITU-R 601), weighted by alpha, decides."""
    alpha_band = rgba.getchannel("A")
    lowest, _ = alpha_band.getextrema()
    if lowest == 255:
        return _WHITE  # opaque: the backdrop never shows
    # A thumbnail is enough to tell light from dark, and keeps a 16 MP upload from costing
    # hundreds of MB of float copies.
    small = rgba.copy()
    small.thumbnail((256, 256))
    arr = np.asarray(small, dtype=np.float32)
    alpha = arr[..., 3]
    if alpha.sum() == 0:
        return _WHITE
    luma = arr[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return _BLACK if float((luma * alpha).sum() / alpha.sum()) > 127.5 else _WHITE


@dataclass(frozen=True)
class PreprocessConfig:
    """Geometry and colour of the model's input."""

    height: int = 32
    width: int = 128
    channels: int = 1  # 1: grayscale (luma), 3: RGB

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError("channels must be 1 or 3")
        if self.height < 8 or self.width < 8:
            raise ValueError("input size must be at least 8x8")

    def to_dict(self) -> dict:
        """JSON-serialisable form, stored in checkpoints."""
        return asdict(self)


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    # Pillow's convert("L") clips 16/32-bit values at 255 instead of scaling them.
    arr = np.asarray(img)
    if img.mode == "F":
        peak = 1.0 if float(np.nanmax(arr, initial=0.0)) <= 1.0 else 255.0
        arr = np.nan_to_num(arr / peak * 255.0)
    else:
        arr = arr.astype(np.float64)
        peak = float(arr.max(initial=0))
        if peak > 255:
            arr = arr / (65535.0 if peak <= 65535 else peak) * 255.0
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")


class UnsupportedImageMode(ValueError):
    """A decoded image whose pixel mode (e.g. LAB) has no conversion to grayscale or RGB."""


#: An image is shrunk by a whole factor (box filter) before anything else only while each
#: side stays at least this many times the model input's longer side; the bilinear resize
#: does the rest. Pillow's ``reducing_gap``: from 3 on, "indistinguishable from" resampling
#: the full image. So a 16-megapixel upload costs its decoded size once, not once per
#: conversion, and crops of ordinary size are untouched.
REDUCING_GAP = 3.0

#: Modes whose pixels can be averaged (``Image.reduce``): not palette indices or 1-bit.
_REDUCIBLE = frozenset({"L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F"})


def decode_side(cfg: PreprocessConfig) -> int:
    """The shortest side, in pixels, a large image is decoded or shrunk to: ``REDUCING_GAP``
    times the input's longer side (a tall crop's side may become either after turning)."""
    return math.ceil(REDUCING_GAP * max(cfg.width, cfg.height))


def draft(img: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    """Ask the decoder of a not yet loaded image to decode it at a reduced scale while both
    sides stay at least ``decode_side(cfg)``: JPEG decodes at 1/2, 1/4 or 1/8 scale, in a
    fraction of the memory and time; other formats ignore it. Returns ``img``."""
    side = decode_side(cfg)
    img.draft(None, (side, side))
    return img


def _upright(img: Image.Image) -> Image.Image:
    # ImageOps.exif_transpose copies the whole image even when there is nothing to turn.
    if img.getexif().get(ExifTags.Base.Orientation, 1) == 1:
        return img
    return ImageOps.exif_transpose(img)


def _shrink(img: Image.Image, min_side: int | None) -> Image.Image:
    factor = 1 if min_side is None else min(img.size) // min_side
    if factor < 2:
        return img
    if img.mode.startswith("I;16"):
        img = img.convert("I")  # exact, and averageable (16-bit PNG and TIFF)
    return img.reduce(factor) if img.mode in _REDUCIBLE else img


def canonicalize(img: Image.Image, channels: int = 1, min_side: int | None = None) -> Image.Image:
    """Bring a decoded image of any common mode to upright ``L`` (or ``RGB``); may return
    ``img`` itself.

    Handles the first frame of animations, EXIF orientation, alpha (composited on
    white, or on black behind light visible pixels: ``_backdrop``), palettes, CMYK, 1-bit and 16/32-bit integer or float images.
    With ``min_side`` (pixels) a large image is first shrunk by a whole factor while both
    sides stay at least that long (``REDUCING_GAP``).
    """
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    img.load()
    img = _shrink(_upright(img), min_side)
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        img = _high_bit_depth_to_l(img)
    elif mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode == "PA":
        img = img.convert("RGBA")
    img = _shrink(img, min_side)  # the modes that could not be averaged before converting
    if img.mode in ("LA", "RGBA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _backdrop(rgba) + (255,))
        img = Image.alpha_composite(background, rgba).convert("RGB")
    target = "L" if channels == 1 else "RGB"
    if img.mode != target:
        try:
            img = img.convert(target)
        except ValueError as exc:  # e.g. LAB or premultiplied La: Pillow has no conversion
            raise UnsupportedImageMode(f"unsupported image mode {mode!r}: {exc}") from None
    return img


def resize(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """Canonicalise and resize to the model input; returns uint8 ``HxW`` or ``HxWx3``.

    The crop is stretched to the fixed size (no aspect-ratio padding), as in most STR
    models: the TPS stage and the training data absorb the distortion.
    """
    return _resize_canonical(canonicalize(img, cfg.channels, decode_side(cfg)), cfg)


def _resize_canonical(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    # The resize step of ``resize`` alone, for an image ``canonicalize`` already gave.
    if img.size != (cfg.width, cfg.height):
        img = img.resize((cfg.width, cfg.height), Image.Resampling.BILINEAR)
    return np.array(img, dtype=np.uint8)


@dataclass(frozen=True)
class ViewConfig:
    """Which views of a crop the reader tries besides the crop itself (``views``).

    Each view is one more model input; ``model.reading`` reads the further views of a
    crop only when the crop alone reads less confidently than ``confident_at``, and the
    most confident reading is the answer. Chosen per shipped model on the validation
    crops (README, "Reading options"; the measurements: weights/TRAINING_LOG.md, "Reading views").
    """

    #: A crop taller than wide usually holds a word written along its long side (a
    #: vertical sign), one way or the other: also read it turned 90° each way.
    turn_tall: bool = True
    #: Also read the crop contrast-stretched (5 % clipped at each end) and
    #: histogram-equalised: low-contrast, washed-out and unevenly lit photos. Off by
    #: default since safl-small@20f0b56a81ad: trained on degraded crops, it reads as well
    #: without them, within noise (val-unseen 220 crops right without them, 216 with them;
    #: val 1,576 and 1,563), at 1.11 instead of 2.53 model inputs per crop.
    contrast: bool = False
    #: A first reading at least this confident is the answer without further views
    #: (1 reads every view of every crop).
    confident_at: float = 0.6

    def __post_init__(self) -> None:
        if not 0.0 <= self.confident_at <= 1.0:
            raise ValueError(f"confident_at must be in [0, 1], got {self.confident_at}")

    def max_views(self) -> int:
        """Most model inputs one crop can take (a tall crop with every view on)."""
        return (3 if self.turn_tall else 1) * (3 if self.contrast else 1)


def views(img: Image.Image, cfg: PreprocessConfig, view_cfg: ViewConfig = ViewConfig()) -> list[np.ndarray]:
    """The model inputs to read for one crop, ``resize(img)`` first (the only one
    training stores), then the further views ``view_cfg`` asks for: for each
    orientation (upright, and turned both ways for a tall crop), the resized crop and
    its contrast variants, computed on the resized pixels.
    """
    img = canonicalize(img, cfg.channels, decode_side(cfg))
    turned = [img]
    if view_cfg.turn_tall and img.height > img.width:
        turned += [img.transpose(t) for t in (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270)]
    out = []
    for oriented in turned:
        arr = _resize_canonical(oriented, cfg)  # canonicalised once above, not per view
        out.append(arr)
        if view_cfg.contrast:
            small = Image.fromarray(arr)
            out += [np.array(ImageOps.autocontrast(small, cutoff=5)), np.array(ImageOps.equalize(small))]
    return out


def to_tensor(arr: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., H, W]`` (grayscale) or ``[..., H, W, 3]`` → float in [-1, 1], channels first.

    Accepts one image or a batch; a grayscale input gets a channel axis of 1.
    """
    import torch  # here, not at the top: the ONNX reader pre-processes without PyTorch (``to_array``)

    t = torch.as_tensor(arr)
    if t.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels, got {t.dtype}")
    if t.shape[-1] == 3 and t.dim() >= 3:
        t = t.movedim(-1, -3)
    else:
        t = t.unsqueeze(-3)
    return t.float().div_(127.5).sub_(1.0)


def to_pixels(t: torch.Tensor) -> np.ndarray:
    """The inverse of ``to_tensor``: float ``[..., C, H, W]`` in [-1, 1] → uint8
    ``[..., H, W]`` (one channel) or ``[..., H, W, 3]``, rounded and clipped."""
    import torch

    px = t.detach().float().cpu().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    return px.squeeze(-3).numpy() if px.shape[-3] == 1 else px.movedim(-3, -1).numpy()


def preprocess(img: Image.Image, cfg: PreprocessConfig) -> torch.Tensor:
    """PIL image → normalised ``[C, H, W]`` tensor, exactly as the model was trained."""
    return to_tensor(resize(img, cfg))


def collate(images: list[torch.Tensor]) -> torch.Tensor:
    """Stack preprocessed ``[C, H, W]`` tensors into a batch."""
    import torch

    if not images:
        raise ValueError("cannot collate an empty list of images")
    return torch.stack(images, dim=0)


def to_array(arrs: list[np.ndarray]) -> np.ndarray:
    """``collate([to_tensor(a) for a in arrs])`` in NumPy, bit for bit (float32 division and
    subtraction, the same two steps): uint8 ``[H, W]`` or ``[H, W, 3]`` images → float32
    ``[B, C, H, W]`` in [-1, 1]. Raises ``ValueError`` for an empty list."""
    if not arrs:
        raise ValueError("cannot collate an empty list of images")
    batch = np.stack(arrs).astype(np.float32)
    batch = batch[:, None] if batch.ndim == 3 else batch.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(batch / np.float32(127.5) - np.float32(1.0))
