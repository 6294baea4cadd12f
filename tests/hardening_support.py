"""Helpers for the hardening tests: nasty images, a real ``python -m service serve`` process, figures.

Figures (inputs tried, 503 share, memory deltas, requests lost) are printed (``-s`` shows
them) and, when ``SAFL_HARDENING_FIGURES=path.jsonl`` is set, appended to that file as one
JSON object per line.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from conftest import render_word
from PIL import Image
from service_support import REPO, free_port, subprocess_env, wait_process_ready

#: Statuses the API documents for client input on POST /recognize (503/504 only come from load and deadlines).
CLIENT_ERRORS = {400, 413, 415, 422}


def env_float(name: str, default: float) -> float:
    """A float from the environment, ``default`` when unset or empty."""
    raw = os.environ.get(name, "")
    return float(raw) if raw.strip() else default


def record_figures(test: str, **figures: Any) -> None:
    """Print one test's figures and append them to ``$SAFL_HARDENING_FIGURES`` when set."""
    line = json.dumps({"test": test, **figures}, sort_keys=True, default=str)
    print(f"\nFIGURES {line}")
    target = os.environ.get("SAFL_HARDENING_FIGURES")
    if target:
        with open(target, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


def assert_error_json(r: httpx.Response, statuses: set[int] | None = None) -> dict[str, str]:
    """``r`` is an error reply in the one documented shape; returns its ``error`` object."""
    if statuses is not None:
        assert r.status_code in statuses, (r.status_code, r.text[:500])
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert isinstance(body["error"]["code"], str) and body["error"]["code"]
    assert "Traceback" not in r.text
    return body["error"]


def assert_results(r: httpx.Response, count: int) -> list[dict[str, Any]]:
    """``r`` is a 200 with ``count`` well-formed results."""
    assert r.status_code == 200, r.text[:500]
    results = r.json()["results"]
    assert len(results) == count
    for x in results:
        assert isinstance(x["text"], str) and 0.0 <= x["confidence"] <= 1.0
        assert len(x["char_confidences"]) == len(x["text"])
    return results


# --- nasty images


def encode(img: Image.Image, fmt: str = "PNG", **save: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring ``width x height`` with almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b"")


def jpeg_with_size(jpeg: bytes, width: int, height: int) -> bytes:
    """``jpeg`` with the dimensions in its SOF header rewritten."""
    i = 2
    while i + 4 <= len(jpeg):
        marker = jpeg[i + 1]
        seglen = struct.unpack(">H", jpeg[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            return jpeg[: i + 5] + struct.pack(">HH", height, width) + jpeg[i + 9 :]
        i += 2 + seglen
    raise ValueError("no SOF segment")


def gif_with_screen(gif: bytes, width: int, height: int) -> bytes:
    return gif[:6] + struct.pack("<HH", width, height) + gif[10:]


def bmp_with_size(bmp: bytes, width: int, height: int) -> bytes:
    return bmp[:18] + struct.pack("<ii", width, height) + bmp[26:]


def tiff_with_size(tiff: bytes, width: int, height: int) -> bytes:
    """A little-endian TIFF with its ImageWidth/ImageLength tags rewritten (LONG values)."""
    assert tiff[:4] == b"II*\x00"
    out = bytearray(tiff)
    ifd = struct.unpack("<I", tiff[4:8])[0]
    (count,) = struct.unpack("<H", tiff[ifd : ifd + 2])
    for k in range(count):
        at = ifd + 2 + 12 * k
        tag = struct.unpack("<H", tiff[at : at + 2])[0]
        if tag in (256, 257):
            out[at + 2 : at + 12] = struct.pack("<HII", 4, 1, width if tag == 256 else height)
    return bytes(out)


def webp_vp8x(width: int, height: int) -> bytes:
    """An extended WebP header declaring a ``width x height`` canvas and nothing else."""
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x


def _exif_rotated(orientation: int) -> bytes:
    img = render_word("turn", (128, 32), "RGB").rotate(90, expand=True)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", exif=exif.tobytes())


def _animation(fmt: str, mode: str) -> bytes:
    frames = [render_word(w, (96, 32)).convert(mode) for w in ("one", "two", "three")]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


@dataclass(frozen=True)
class Nasty:
    """One hand-made upload and the replies that are correct for it."""

    name: str
    data: bytes
    statuses: frozenset[int]
    code: str | None = None  # the error code, when the reply must be an error


def nasty_images() -> list[Nasty]:
    """Images that decode (odd but valid: must be 200) and images that must be refused with a 4xx."""
    word = render_word("hello")
    png, jpg, gif = encode(word), encode(word.convert("RGB"), "JPEG"), encode(word.convert("P"), "GIF")
    bmp, tif, webp = encode(word, "BMP"), encode(word, "TIFF"), encode(word.convert("RGB"), "WEBP")
    palette = word.convert("P")
    palette.info["transparency"] = 0
    i16 = Image.fromarray(np.asarray(word).astype(np.uint16) * 257)  # mode I;16
    f32 = Image.fromarray(np.asarray(word).astype(np.float32) / 255.0)  # mode F
    ok = {
        "png": png,
        "jpeg": jpg,
        "gif": gif,
        "bmp": bmp,
        "tiff": tif,
        "webp": webp,
        "1x1": encode(Image.new("L", (1, 1), 0)),
        "1x20000": encode(Image.new("L", (1, 20000), 255)),
        "20000x1": encode(Image.new("L", (20000, 1), 255)),
        "animated_gif": _animation("GIF", "P"),
        "apng": _animation("PNG", "RGB"),
        "animated_webp": _animation("WEBP", "RGB"),
        "multipage_tiff": _animation("TIFF", "L"),
        "cmyk_jpeg": encode(word.convert("CMYK"), "JPEG"),
        "progressive_jpeg": encode(word.convert("RGB"), "JPEG", progressive=True),
        "png_16bit": encode(i16, "PNG"),
        "tiff_16bit": encode(i16, "TIFF"),
        "tiff_float": encode(f32, "TIFF"),
        "palette_transparency_png": encode(palette, "PNG"),
        "palette_transparency_gif": encode(palette, "GIF"),
        "la_png": encode(word.convert("LA"), "PNG"),
        "rgba_webp": encode(word.convert("RGBA"), "WEBP"),
        "1bit_bmp": encode(word.convert("1"), "BMP"),
        "1bit_tiff_group4": encode(word.convert("1"), "TIFF", compression="group4"),
        "tiff_jpeg_compressed": encode(word.convert("RGB"), "TIFF", compression="jpeg"),
        "exif_rotated_90": _exif_rotated(6),
        "exif_rotated_270": _exif_rotated(8),
        "exif_invalid_orientation": _exif_rotated(9),
    }
    cases = [Nasty(name, data, frozenset({200})) for name, data in ok.items()]

    def bad(name: str, data: bytes, status: int | set[int], code: str | None) -> Nasty:
        return Nasty(name, data, frozenset({status} if isinstance(status, int) else status), code)

    cases += [
        bad("empty", b"", 422, "empty_file"),
        bad("truncated_png_header", png[:20], 422, "corrupt_image"),
        bad("truncated_png_half", png[: len(png) // 2], 422, "corrupt_image"),
        bad("truncated_jpeg_header", jpg[:30], 422, "corrupt_image"),
        bad("truncated_jpeg_half", jpg[: len(jpg) // 2], 422, "corrupt_image"),
        bad("truncated_gif", gif[:30], 422, "corrupt_image"),
        bad("truncated_webp", webp[:40], 422, "corrupt_image"),
        bad("truncated_tiff", tif[:100], 422, "corrupt_image"),
        bad("truncated_bmp", bmp[:60], 422, "corrupt_image"),
        bad("png_magic_jpeg_body", b"\x89PNG\r\n\x1a\n" + jpg[8:], 422, "corrupt_image"),
        bad("jpeg_magic_png_body", b"\xff\xd8\xff" + png[3:], 422, "corrupt_image"),
        bad("png_wrong_magic", b"\x00" + png[1:], 415, "unsupported_image"),
        bad("text", b"hello world\n" * 10, 415, "unsupported_image"),
        bad("pdf", b"%PDF-1.4\n" + b"x" * 100, 415, "unsupported_image"),
        bad("zip", b"PK\x03\x04" + b"\x00" * 100, 415, "unsupported_image"),
        bad("ico", encode(render_word("i", (32, 32)), "ICO"), 415, "unsupported_image"),
        bad("ppm", encode(word, "PPM"), 415, "unsupported_image"),
        bad("huge_png_100000x100000", png_header_only(100_000, 100_000), 413, "too_many_pixels"),
        bad("huge_png_2000x2000", png_header_only(2000, 2000), 413, "too_many_pixels"),  # over the tests' 1 Mpx, under Pillow's limit
        bad("huge_jpeg_65000x65000", jpeg_with_size(jpg, 65000, 65000), 413, "too_many_pixels"),
        bad("huge_gif_65535x65535", gif_with_screen(gif, 65535, 65535), 413, "too_many_pixels"),
        bad("huge_bmp_60000x60000", bmp_with_size(bmp, 60000, 60000), 413, "too_many_pixels"),
        bad("huge_tiff_60000x60000", tiff_with_size(tif, 60000, 60000), 413, "too_many_pixels"),
        bad("huge_webp_16384x16384", webp_vp8x(16384, 16384), {413, 422}, None),
        bad("zero_png", png_header_only(0, 0), 422, "corrupt_image"),
        bad("zero_width_png", png_header_only(0, 10), 422, "corrupt_image"),
        bad("zero_bmp", bmp_with_size(bmp, 0, 10), 422, "corrupt_image"),
        bad("zero_jpeg", jpeg_with_size(jpg, 0, 0), 422, "corrupt_image"),
        # Pillow takes the size of the first frame when the logical screen is 0x0: decodable or refused.
        bad("zero_screen_gif", gif_with_screen(gif, 0, 0), {200, 422}, None),
    ]
    return cases


def seed_images() -> list[bytes]:
    """Small valid files of every allowed format: the starting points for mutation."""
    return [n.data for n in nasty_images() if n.statuses == {200} and len(n.data) < 20_000]


# --- a real server process


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=10).text

    def output(self) -> str:
        """What the server wrote to stdout and stderr so far."""
        return self.log.read_text(errors="replace")


@contextmanager
def serve_process(args: list[str], log: Path, ready_timeout: float = 90.0, script: Path | None = None) -> Iterator[ServerProcess]:
    """``python -m service serve --host 127.0.0.1 --port P ARGS`` (or ``python SCRIPT P ARGS``), once ready.

    Its output goes to the file ``log`` (a pipe nobody reads could fill and stall it). It is
    killed on exit if the test left it running.
    """
    port = free_port()
    if script is None:
        cmd = [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    else:
        cmd = [sys.executable, str(script), str(port), *args]
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT)
    server = ServerProcess(proc, url, log)
    try:
        wait_process_ready(url, proc, ready_timeout, server.output)
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
