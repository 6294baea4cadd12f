"""Bad input gets a clear 4xx in the one error shape, and nothing else changes.

Most cases go over real HTTP to a uvicorn server in a thread; the two that need to
stream a body past the limit use the ASGI transport (a real socket would be reset by
the early reply before the client reads it).
"""

from __future__ import annotations

import base64
import io
import socket
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import render_word
from PIL import Image
from service_support import encode, metric, multipart, running_app, serve_in_thread, settings_for

from service import create_app

LIMITS = {"max_files": 4, "max_file_bytes": 200_000, "max_body_bytes": 1_000_000, "max_pixels": 1_000_000}


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[str]:
    app = create_app(settings_for(tiny_checkpoint, **LIMITS))
    with serve_in_thread(app) as url:
        yield url


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` but carries almost no data (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


_PNG = encode(render_word("ok"))
_JPEG = encode(render_word("ok", (128, 32), "RGB"), "JPEG")


def _noise_png(size: tuple[int, int]) -> bytes:
    import numpy as np

    rng = np.random.default_rng(0)
    return encode(Image.fromarray(rng.integers(0, 255, (size[1], size[0]), dtype=np.uint8)))


# (id, request kwargs, status, code, text the message must contain)
CASES: list[tuple[str, Callable[[], dict[str, Any]], int, str, str]] = [
    ("no_files_part", lambda: {"data": {"note": "x"}, "files": [("note2", ("", b"", "text/plain"))]}, 422, "no_files", "files"),
    ("file_under_other_name", lambda: {"files": [("other", ("a.png", _PNG, "image/png"))]}, 422, "unexpected_file", "'other'"),
    ("only_form_field", lambda: {"data": {"files": "not-a-file"}, "files": [("files", ("x.png", _PNG, "image/png"))]}, 422, "not_a_file", "#0"),
    ("empty_body", lambda: {}, 422, "no_files", "no body"),
    ("empty_file", lambda: {"files": multipart([b""], ["empty.png"])}, 422, "empty_file", "empty.png"),
    ("text_file", lambda: {"files": multipart([b"hello, world\n" * 10], ["notes.txt"])}, 415, "unsupported_image", "notes.txt"),
    ("ico_format", lambda: {"files": multipart([encode(render_word("ico", (32, 32)), "ICO")], ["icon.ico"])}, 415, "unsupported_image", "icon.ico"),
    ("ppm_format", lambda: {"files": multipart([encode(render_word("ppm"), "PPM")], ["w.ppm"])}, 415, "unsupported_image", "w.ppm"),
    # A valid TIFF whose LAB pixels Pillow cannot convert: unsupported, not corrupt.
    ("lab_tiff", lambda: {"files": multipart([encode(Image.new("LAB", (40, 20)), "TIFF")], ["lab.tiff"])}, 415, "unsupported_image", "mode 'LAB'"),
    ("truncated_png", lambda: {"files": multipart([_PNG[: len(_PNG) // 2]], ["cut.png"])}, 422, "corrupt_image", "cut.png"),
    ("truncated_jpeg", lambda: {"files": multipart([_JPEG[: len(_JPEG) // 2]], ["cut.jpg"])}, 422, "corrupt_image", "cut.jpg"),
    ("garbage_after_magic", lambda: {"files": multipart([b"\x89PNG\r\n\x1a\n" + b"\x00" * 64], ["bad.png"])}, 422, "corrupt_image", "bad.png"),
    ("one_bad_among_good", lambda: {"files": multipart([_PNG, b"GIF89a-nope", _PNG], ["a.png", "b.gif", "c.png"])}, 422, "corrupt_image", "b.gif"),
    ("too_many_files", lambda: {"files": multipart([_PNG] * 5)}, 413, "too_many_files", "4"),
    ("file_too_large", lambda: {"files": multipart([_noise_png((600, 600))], ["big.png"])}, 413, "file_too_large", "big.png"),
    ("bomb_header", lambda: {"files": multipart([_png_header_only(50_000, 50_000)], ["bomb.png"])}, 413, "too_many_pixels", "bomb.png"),
    ("just_over_pixels", lambda: {"files": multipart([encode(Image.new("L", (1001, 1000), 255))], ["wide.png"])}, 413, "too_many_pixels", "1001x1000"),
    ("json_invalid", lambda: {"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, "invalid_json", "JSON"),
    ("json_empty_list", lambda: {"json": {"images": []}}, 422, "no_files", "images"),
    ("json_wrong_shape", lambda: {"json": {"images": "abc"}}, 422, "validation_error", "images"),
    ("json_unknown_key", lambda: {"json": {"image": "abc"}}, 422, "invalid_option", "'image'"),
    ("json_bad_base64", lambda: {"json": {"images": ["%%%not base64%%%"]}}, 422, "invalid_base64", "image-0"),
    ("json_not_image", lambda: {"json": {"images": [base64.b64encode(b"plain text").decode()]}}, 415, "unsupported_image", "image-0"),
    ("json_too_many", lambda: {"json": {"images": [base64.b64encode(_PNG).decode()] * 5}}, 413, "too_many_files", "5"),
    ("wrong_content_type", lambda: {"content": b"abc", "headers": {"content-type": "text/plain"}}, 415, "unsupported_content_type", "text/plain"),
    (
        "multipart_no_boundary",
        lambda: {"content": b"--xyz\r\nnonsense", "headers": {"content-type": "multipart/form-data"}},
        400,
        "malformed_multipart",
        "boundary",
    ),
    ("bad_timeout_header", lambda: {"files": multipart([_PNG]), "headers": {"X-Request-Timeout-Ms": "soon"}}, 422, "invalid_timeout", "X-Request-Timeout-Ms"),
]


@pytest.mark.parametrize(("request_kwargs", "status", "code", "mention"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(server: str, request_kwargs: Callable[[], dict[str, Any]], status: int, code: str, mention: str) -> None:
    before = httpx.get(server + "/metrics").text
    r = httpx.post(server + "/recognize", timeout=30, **request_kwargs())
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and set(r.json()["error"]) == {"code", "message"}
    assert r.json()["error"]["code"] == code
    assert mention in r.json()["error"]["message"]
    assert "Traceback" not in r.text
    after = httpx.get(server + "/metrics").text
    # Rejected before queueing: the model ran no batch for it.
    assert metric(after, "safl_batch_size_count") == metric(before, "safl_batch_size_count")
    assert metric(after, "safl_errors_total", reason=code) == metric(before, "safl_errors_total", reason=code) + 1
    ok = httpx.post(server + "/recognize", files=multipart([_PNG]), timeout=30)
    assert ok.status_code == 200 and httpx.get(server + "/readyz").status_code == 200


def test_declared_body_too_large_is_refused_unread(server: str) -> None:
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        # Only the headers are sent: the reply must come without the server waiting for the body.
        sock.sendall(b"POST /recognize HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 2000000\r\n\r\n")
        reply = b""
        while b'"}}' not in reply:
            data = sock.recv(65536)
            if not data:
                break
            reply += data
        reply = reply.decode("latin-1")
    assert reply.startswith("HTTP/1.1 413")
    assert '"code":"body_too_large"' in reply


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_streamed_body_over_limit(tiny_checkpoint: Path) -> None:
    sent = 0

    async def chunks() -> Any:
        # No Content-Length (chunked): the limit is enforced by counting what streams in.
        nonlocal sent
        head = b'--b\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n\r\n'
        yield head
        for _ in range(40):
            sent += 65536
            yield b"\0" * 65536

    async with running_app(settings_for(tiny_checkpoint, **LIMITS)) as (app, client):
        r = await client.post("/recognize", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
        assert (await client.post("/recognize", files=multipart([_PNG]))).status_code == 200
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert sent < 40 * 65536  # it stopped reading early


@pytest.mark.anyio
async def test_pillow_bomb_warning_is_an_error(tiny_checkpoint: Path) -> None:
    # max_pixels above Pillow's own limit: Pillow's DecompressionBombWarning must still reject it.
    limit = Image.MAX_IMAGE_PIXELS
    assert limit is not None
    side = int((limit * 1.2) ** 0.5)
    settings = settings_for(tiny_checkpoint, max_pixels=10 * limit)
    async with running_app(settings) as (app, client):
        r = await client.post("/recognize", files=multipart([_png_header_only(side, side)], ["warn.png"]))
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_pixels"
    assert "warn.png" in r.json()["error"]["message"]


def test_gif_first_frame_and_exif_orientation(server: str) -> None:
    frames = [render_word("one", (96, 32)).convert("P"), render_word("two", (96, 32)).convert("P")]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    anim = buf.getvalue()
    single = encode(frames[0], "GIF")
    r = httpx.post(server + "/recognize", files=multipart([anim, single], ["anim.gif", "single.gif"]), timeout=30)
    assert r.status_code == 200
    a, b = r.json()["results"]
    assert a["text"] == b["text"] and a["confidence"] == pytest.approx(b["confidence"], rel=1e-4, abs=1e-30)
