"""Decode and validate one uploaded image, then hand it to the shared pre-processing.

Checks run cheapest first and the expensive decode last: byte size, then the format
(only Pillow's PNG/JPEG/WebP/BMP/TIFF/GIF plugins are ever tried), then the pixel
count read from the header, and only then ``load()``. Resizing and normalising are
``model.preprocess``'s job alone (``views`` → ``to_tensor``), so the service sees
exactly the pixels training saw.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError

from model.preprocess import PreprocessConfig, UnsupportedImageMode, ViewConfig, to_tensor, views

from .errors import APIError

#: Pillow format names of the uploads we accept (GIF and TIFF: first frame only).
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
_ALLOWED_TEXT = "PNG, JPEG, WebP, BMP, TIFF or GIF"

# Leading bytes of the allowed formats: tells "a PNG we could not parse" (corrupt, 422)
# from "not one of our formats" (415) without asking any other Pillow plugin.
_MAGIC: tuple[tuple[int, bytes], ...] = (
    (0, b"\x89PNG\r\n\x1a\n"),
    (0, b"\xff\xd8\xff"),
    (0, b"GIF87a"),
    (0, b"GIF89a"),
    (0, b"BM"),
    (0, b"II*\x00"),
    (0, b"MM\x00*"),
    (8, b"WEBP"),
)


class ImageRejected(APIError):
    """An upload that is not a usable image; ``status`` is 413, 415 or 422."""


@dataclass(frozen=True)
class ImageLimits:
    """Per-image limits, checked before decoding."""

    max_file_bytes: int
    max_pixels: int


def treat_bomb_warning_as_error() -> None:
    """Make Pillow's ``DecompressionBombWarning`` raise, process-wide.

    ``warnings.catch_warnings`` is not thread-safe and decoding runs in worker threads,
    so the filter is installed once at start-up instead of around each decode. The
    explicit pixel check in ``decode_image`` fires first for any ``max_pixels`` below
    Pillow's own limit; this filter covers the rest.
    """
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


def _looks_allowed(data: bytes) -> bool:
    return any(data[offset : offset + len(magic)] == magic for offset, magic in _MAGIC)


def _too_many_pixels(filename: str, detail: str) -> ImageRejected:
    return ImageRejected(413, "too_many_pixels", f"image {filename!r} {detail}")


def decode_image(data: bytes, filename: str, limits: ImageLimits) -> Image.Image:
    """Validate and decode ``data``; raises ``ImageRejected`` naming ``filename``.

    The returned image is fully loaded (first frame for animations).
    """
    if not data:
        raise ImageRejected(422, "empty_file", f"file {filename!r} is empty")
    if len(data) > limits.max_file_bytes:
        raise ImageRejected(413, "file_too_large", f"file {filename!r} is {len(data)} bytes; the limit is {limits.max_file_bytes}")
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_many_pixels(filename, f"is too large to decode ({exc})") from None
    except UnidentifiedImageError:
        if _looks_allowed(data):
            raise ImageRejected(422, "corrupt_image", f"file {filename!r} is a corrupt or truncated image") from None
        raise ImageRejected(415, "unsupported_image", f"file {filename!r} is not a {_ALLOWED_TEXT} image") from None
    except Exception as exc:  # any parser failure on client bytes is the client's problem
        raise ImageRejected(422, "corrupt_image", f"file {filename!r} could not be read as an image: {exc}") from None
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageRejected(422, "corrupt_image", f"image {filename!r} has no pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        # Rejected from the header alone: the pixel data is never decompressed.
        raise _too_many_pixels(filename, f"is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}")
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_many_pixels(filename, f"is too large to decode ({exc})") from None
    except Exception as exc:
        raise ImageRejected(422, "corrupt_image", f"file {filename!r} is a corrupt or truncated {img.format} image: {exc}") from None
    return img


def to_model_input(img: Image.Image, filename: str, cfg: PreprocessConfig, view_cfg: ViewConfig = ViewConfig()) -> list[torch.Tensor]:
    """The crop's views (``model.preprocess.views``) as ``[C, H, W]`` tensors, with the
    failures reported: 415 for pixel modes it cannot convert (e.g. LAB), 422 for
    anything else (broken EXIF, …)."""
    try:
        return [to_tensor(v) for v in views(img, cfg, view_cfg)]
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_many_pixels(filename, f"is too large to decode ({exc})") from None
    except UnsupportedImageMode as exc:  # a valid file, just pixels we cannot read
        raise ImageRejected(415, "unsupported_image", f"image {filename!r}: {exc}") from None
    except Exception as exc:
        raise ImageRejected(422, "corrupt_image", f"image {filename!r} could not be converted: {exc}") from None


def load_crop(data: bytes, filename: str, limits: ImageLimits, cfg: PreprocessConfig, view_cfg: ViewConfig = ViewConfig()) -> list[torch.Tensor]:
    """Bytes of one upload → the model's ``[C, H, W]`` inputs, one per view
    (``model.preprocess.views``), or ``ImageRejected``."""
    return to_model_input(decode_image(data, filename, limits), filename, cfg, view_cfg)
