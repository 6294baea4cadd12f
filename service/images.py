"""Decode and validate one uploaded image, then hand it to the shared pre-processing.

Checks run cheapest first and the expensive decode last: byte size, then the format
(only Pillow's PNG/JPEG/WebP/BMP/TIFF/GIF plugins are ever tried), then the pixel
count read from the header, and only then ``load()``. Resizing and normalising are
``model.preprocess``'s job alone (``views`` → ``to_tensor``), so the service sees
exactly the pixels training saw.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image, UnidentifiedImageError

from model.preprocess import PreprocessConfig, UnsupportedImageMode, ViewConfig, draft, to_tensor, views

if TYPE_CHECKING:  # tensors only in to_model_input: `safl recognize` reads cached ONNX graphs without PyTorch
    import numpy as np
    import torch

from .decode_budget import DecodeBudget, decode_cost
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
    """An upload that is not a usable image (a 413, 415 or 422 code of ``ERRORS``)."""


@dataclass(frozen=True)
class ImageLimits:
    """Limits checked before decoding: per image, and the pixels of a request's images
    together (``None``: no such limit); and the decode memory all requests share."""

    max_file_bytes: int
    max_pixels: int
    max_request_pixels: int | None = None
    #: Memory the images being decoded may take at once, every request's together (``None``: no limit).
    decode_budget: DecodeBudget | None = None

    def decoding(self, img: Image.Image, check: Callable[[], None]) -> AbstractContextManager[None]:
        """Hold ``img``'s share of ``decode_budget`` (``decode_cost``) while it is decoded and
        converted; ``check`` runs while it waits for room, and what it raises ends the wait."""
        if self.decode_budget is None:
            return contextlib.nullcontext()
        return self.decode_budget.reserve(decode_cost(img), check)


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
    return ImageRejected("too_many_pixels", f"image {filename!r} {detail}")


def open_image(data: bytes, filename: str, limits: ImageLimits) -> Image.Image:
    """Validate ``data`` and read its header, without decoding the pixels; raises
    ``ImageRejected`` naming ``filename``."""
    if not data:
        raise ImageRejected("empty_file", f"file {filename!r} is empty")
    if len(data) > limits.max_file_bytes:
        raise ImageRejected("file_too_large", f"file {filename!r} is {len(data)} bytes; the limit is {limits.max_file_bytes}")
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_many_pixels(filename, f"is too large to decode ({exc})") from None
    except UnidentifiedImageError:
        if _looks_allowed(data):
            raise ImageRejected("corrupt_image", f"file {filename!r} is a corrupt or truncated image") from None
        raise ImageRejected("unsupported_image", f"file {filename!r} is not a {_ALLOWED_TEXT} image") from None
    except Exception as exc:  # any parser failure on client bytes is the client's problem
        raise ImageRejected("corrupt_image", f"file {filename!r} could not be read as an image: {exc}") from None
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageRejected("corrupt_image", f"image {filename!r} has no pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        # Rejected from the header alone: the pixel data is never decompressed.
        raise _too_many_pixels(filename, f"is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}")
    return img


def _load(img: Image.Image, filename: str) -> Image.Image:
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_many_pixels(filename, f"is too large to decode ({exc})") from None
    except Exception as exc:
        raise ImageRejected("corrupt_image", f"file {filename!r} is a corrupt or truncated {img.format} image: {exc}") from None
    return img


def decode_image(data: bytes, filename: str, limits: ImageLimits) -> Image.Image:
    """Validate and decode ``data``; raises ``ImageRejected`` naming ``filename``.

    The returned image is fully loaded (first frame for animations).
    """
    return _load(open_image(data, filename, limits), filename)


def model_views(img: Image.Image, filename: str, cfg: PreprocessConfig, view_cfg: ViewConfig = ViewConfig()) -> list[np.ndarray]:
    """The crop's views (``model.preprocess.views``, uint8 ``[H, W]`` or ``[H, W, 3]``), with
    the failures reported as ``ImageRejected``: 415 for pixel modes it cannot convert (e.g.
    LAB), 422 for anything else (broken EXIF, …)."""
    try:
        return views(img, cfg, view_cfg)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_many_pixels(filename, f"is too large to decode ({exc})") from None
    except UnsupportedImageMode as exc:  # a valid file, just pixels we cannot read
        raise ImageRejected("unsupported_image", f"image {filename!r}: {exc}") from None
    except Exception as exc:
        raise ImageRejected("corrupt_image", f"image {filename!r} could not be converted: {exc}") from None


def to_model_input(img: Image.Image, filename: str, cfg: PreprocessConfig, view_cfg: ViewConfig = ViewConfig()) -> list[torch.Tensor]:
    """``model_views`` as the model's ``[C, H, W]`` float tensors (``model.preprocess.to_tensor``)."""
    return [to_tensor(v) for v in model_views(img, filename, cfg, view_cfg)]


def load_views(data: bytes, filename: str, limits: ImageLimits, cfg: PreprocessConfig, view_cfg: ViewConfig = ViewConfig()) -> list[np.ndarray]:
    """Bytes of one upload → its views' pixels (``model_views``), or ``ImageRejected``."""
    return model_views(decode_image(data, filename, limits), filename, cfg, view_cfg)


def load_crop(data: bytes, filename: str, limits: ImageLimits, cfg: PreprocessConfig, view_cfg: ViewConfig = ViewConfig()) -> list[torch.Tensor]:
    """Bytes of one upload → the model's ``[C, H, W]`` inputs, one per view
    (``model.preprocess.views``), or ``ImageRejected``."""
    return [to_tensor(v) for v in load_views(data, filename, limits, cfg, view_cfg)]


def load_crops(
    files: Sequence[tuple[bytes, str]],
    limits: ImageLimits,
    cfg: PreprocessConfig,
    view_cfg: ViewConfig = ViewConfig(),
    before_each: Callable[[], None] = lambda: None,
    per_file: bool = False,
) -> list[list[torch.Tensor] | ImageRejected]:
    """``load_crop`` for a request's ``(bytes, filename)`` pairs, in order.

    Every header is read first, so the request's pixel budget
    (``limits.max_request_pixels``) is checked before any image is decoded;
    ``before_each`` runs before each decode (the service checks its deadline there).
    Raises ``ImageRejected`` for the first image that fails; with ``per_file`` a failing
    image's ``ImageRejected`` takes its place in the list instead, and the pixel budget
    (still the request's error) counts the images whose headers could be read.
    """
    opened: list[tuple[Image.Image | ImageRejected, str]] = []
    for data, name in files:
        try:
            opened.append((open_image(data, name, limits), name))
        except ImageRejected as exc:
            if not per_file:
                raise
            opened.append((exc, name))
    readable = [img for img, _ in opened if isinstance(img, Image.Image)]
    total = sum(img.size[0] * img.size[1] for img in readable)
    if limits.max_request_pixels is not None and total > limits.max_request_pixels:
        raise ImageRejected("too_many_pixels", f"the request's {len(readable)} images hold {total} pixels together; the limit is {limits.max_request_pixels}")
    crops: list[list[torch.Tensor] | ImageRejected] = []
    for img, name in opened:
        if isinstance(img, ImageRejected):
            crops.append(img)
            continue
        before_each()
        try:
            with limits.decoding(draft(img, cfg), before_each):  # its cost is known once the decoder's scale is set
                try:
                    crops.append(to_model_input(_load(img, name), name, cfg, view_cfg))
                finally:
                    img.close()  # its full-size pixels, now, not when the whole request is done
        except ImageRejected as exc:
            if not per_file:
                raise
            crops.append(exc)
    return crops
