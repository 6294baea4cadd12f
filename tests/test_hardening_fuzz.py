"""Fuzzing the upload path: whatever a client sends, the reply is documented, never a 500.

Everything goes to the real app with the real tiny model: hand-made nasty images and
hypothesis-generated or mutated image bytes, random multipart bodies and content types
over real HTTP (uvicorn on 127.0.0.1 in a thread), raw header values straight into the
ASGI app (uvicorn's own parser would refuse them before the app sees them), and
schemathesis against the app's own OpenAPI schema.

Every reply must be 200 with well-formed results or a documented 4xx with the standard
error JSON; at the end the server's own metrics must show no 500 and no stuck work.

``SAFL_FUZZ_SCALE`` multiplies every ``max_examples`` (default 1: about 700 inputs,
20-30 s on one thread); e.g. ``SAFL_FUZZ_SCALE=20 python -m pytest tests/test_hardening_fuzz.py`` for a
longer campaign.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import schemathesis
from anyio.from_thread import BlockingPortal, start_blocking_portal
from fastapi import FastAPI
from hardening_support import CLIENT_ERRORS, Nasty, assert_error_json, assert_results, encode, env_float, nasty_images, record_figures, seed_images
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import positive_data_acceptance
from service_support import expected, metric, serve_in_thread, settings_for

from model import SAFL
from model.preprocess import PreprocessConfig
from service import create_app
from service.images import ImageLimits, ImageRejected, load_crop, treat_bomb_warning_as_error

#: Small limits so that every 413 branch is reachable with small inputs.
LIMITS = {"max_files": 4, "max_file_bytes": 200_000, "max_body_bytes": 1_000_000, "max_pixels": 1_000_000, "max_queue": 64}
SCALE = env_float("SAFL_FUZZ_SCALE", 1.0)
NASTY = nasty_images()
SEEDS = seed_images()
TRIED: Counter[str] = Counter()  # inputs sent, by test: the figures
STATUSES: Counter[int] = Counter()


def examples(n: int) -> int:
    return max(1, int(n * SCALE))


def fuzz_settings(n: int) -> Any:
    return settings(max_examples=examples(n), deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[tuple[FastAPI, str]]:
    app = create_app(settings_for(tiny_checkpoint, **LIMITS))
    with serve_in_thread(app) as url:
        yield app, url


@pytest.fixture(scope="module")
def client(server: tuple[FastAPI, str]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server[1], timeout=60) as c:
        yield c


def post(client: httpx.Client, test: str, **kwargs: Any) -> httpx.Response:
    """POST /recognize; the reply is 200 or a documented client error in the standard shape."""
    r = client.post("/recognize", **kwargs)
    TRIED[test] += 1
    STATUSES[r.status_code] += 1
    if r.status_code != 200:
        assert_error_json(r, CLIENT_ERRORS)
    return r


# --- hand-made nasty images


@pytest.mark.parametrize("case", NASTY, ids=[n.name for n in NASTY])
def test_nasty_image(client: httpx.Client, case: Nasty) -> None:
    replies = [
        post(client, "nasty_images", files=[("files", (f"{case.name}.img", case.data, "application/octet-stream"))]),
        post(client, "nasty_images", json={"images": [base64.b64encode(case.data).decode()], "filenames": [f"{case.name}.img"]}),
    ]
    for r in replies:
        assert r.status_code in case.statuses, (r.status_code, r.text[:300])
        if r.status_code == 200:
            assert_results(r, 1)
        else:
            error = assert_error_json(r)
            assert case.code is None or error["code"] == case.code, error
            assert f"{case.name}.img" in error["message"]


def test_nasty_images_among_good_ones_fail_alone(client: httpx.Client) -> None:
    # One bad file fails its own request with its name; the next request is unaffected.
    good = NASTY[0].data
    for case in (n for n in NASTY if 200 not in n.statuses):
        r = post(client, "nasty_images", files=[("files", (n, d, "image/png")) for n, d in [("a.png", good), ("bad.img", case.data), ("c.png", good)]])
        assert r.status_code in case.statuses and "bad.img" in assert_error_json(r)["message"]
    assert_results(post(client, "nasty_images", files=[("files", ("ok.png", good, "image/png"))] * 3), 3)


# --- mutated bytes


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A valid seed image put through 1-4 random byte-level mutations."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        n = len(data)
        op = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "header", "dimension", "splice", "repeat"]))
        if op == "truncate":
            data = data[: draw(st.integers(0, n))]
        elif op == "flip" and n:
            i = draw(st.integers(0, n - 1))
            data[i] ^= draw(st.integers(1, 255))
        elif op == "insert":
            i = draw(st.integers(0, n))
            data[i:i] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete" and n:
            i = draw(st.integers(0, n - 1))
            del data[i : draw(st.integers(i, min(n, i + 256)))]
        elif op == "header" and n:  # the first bytes hold the magic, sizes and modes
            i = draw(st.integers(0, min(n - 1, 64)))
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[i : i + len(chunk)] = chunk
        elif op == "dimension" and n > 4:  # extreme 16/32-bit integers where headers keep sizes
            i = draw(st.integers(0, min(n - 4, 48)))
            value = draw(st.sampled_from([0, 1, 0x7FFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF]))
            fmt = draw(st.sampled_from([">I", "<I", ">H", "<H"]))
            packed = struct.pack(fmt, value & (0xFFFF if "H" in fmt else 0xFFFFFFFF))
            data[i : i + len(packed)] = packed
        elif op == "splice":
            other = draw(st.sampled_from(SEEDS))
            data = data[: draw(st.integers(0, n))] + other[draw(st.integers(0, len(other))) :]
        elif op == "repeat" and n:
            i = draw(st.integers(0, n - 1))
            j = draw(st.integers(i, min(n, i + 512)))
            data[i:i] = data[i:j] * draw(st.integers(1, 8))
    return bytes(data)


@given(data=mutated_images())
@fuzz_settings(400)
def test_mutated_bytes_decode_to_a_crop_or_a_4xx(data: bytes) -> None:
    # The decode path alone (no HTTP), so it can take many more inputs: tensors of the
    # model's shape (one per view) or ImageRejected, nothing else, and never slow.
    treat_bomb_warning_as_error()
    cfg = PreprocessConfig()
    t0 = time.perf_counter()
    try:
        crop_views = load_crop(data, "fuzz.img", ImageLimits(LIMITS["max_file_bytes"], LIMITS["max_pixels"]), cfg)
    except ImageRejected as exc:
        assert exc.status_code in (413, 415, 422) and "fuzz.img" in exc.message
    else:
        assert len(crop_views) in (1, 3)  # default views: the crop, and a tall crop turned each way too
        for crop in crop_views:
            assert crop.shape == (cfg.channels, cfg.height, cfg.width) and bool(crop.isfinite().all())
    TRIED["mutated_decode"] += 1
    assert time.perf_counter() - t0 < 5.0


@given(data=mutated_images())
@fuzz_settings(60)
def test_mutated_bytes_over_http(client: httpx.Client, data: bytes) -> None:
    r = post(client, "mutated_http", files=[("files", ("m.img", data, "application/octet-stream"))])
    if r.status_code == 200:
        assert_results(r, 1)


# --- random valid images: always 200, and the same answer as the model itself

# Pillow modes each format can store.
_MODES = {
    "PNG": ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"],
    "JPEG": ["L", "RGB", "CMYK"],
    "GIF": ["L", "P"],
    "BMP": ["1", "L", "P", "RGB"],
    "TIFF": ["1", "L", "P", "RGB", "RGBA", "CMYK", "I;16", "F"],
    "WEBP": ["RGB", "RGBA"],
}


@st.composite
def valid_images(draw: st.DrawFn) -> tuple[str, bytes]:
    fmt = draw(st.sampled_from(sorted(_MODES)))
    mode = draw(st.sampled_from(_MODES[fmt]))
    w, h = draw(st.integers(1, 400)), draw(st.integers(1, 120))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        base = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), mode="RGBA")
    else:  # a word-like image: dark strokes on a light background
        base = Image.new("RGBA", (w, h), (255, 255, 255, 255))
        for _ in range(3):
            x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
            base.paste((0, 0, 0, 255), (x, y, min(w, x + 1 + w // 6), min(h, y + 1 + h // 2)))
    if mode == "I;16":
        img = Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257)
    elif mode == "F":
        img = Image.fromarray(np.asarray(base.convert("L")).astype(np.float32) / 255.0)
    else:
        img = base.convert(mode)
    return f"{fmt}-{mode}-{w}x{h}", encode(img, fmt)


@given(image=valid_images())
@fuzz_settings(30)
def test_any_valid_image_is_recognised_like_the_model_does(client: httpx.Client, tiny_model: SAFL, image: tuple[str, bytes]) -> None:
    name, data = image
    r = post(client, "valid_random_images", files=[("files", (name, data, "application/octet-stream"))])
    (got,) = assert_results(r, 1)
    want = expected(tiny_model, [data])[0]
    assert got["filename"] == name and got["text"] == want.text
    assert got["confidence"] == pytest.approx(want.confidence, rel=1e-4, abs=1e-30)


# --- random multipart bodies and content types

_TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'()+_,-./:=?", min_size=1, max_size=70)
_LATIN1 = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters='"\\\x7f'), max_size=40)


@st.composite
def multipart_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    """A multipart body, mostly well-formed, with random damage: (Content-Type, body)."""
    boundary = draw(_TOKEN)
    eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        name = draw(st.sampled_from(["files", "files", "files", "other", "", None]))
        filename = draw(st.one_of(st.none(), st.just("a.png"), st.just(""), _LATIN1))
        payload = draw(st.one_of(st.sampled_from(SEEDS), mutated_images(), st.binary(max_size=300)))
        disposition = "form-data"
        if name is not None:
            disposition += f'; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        headers = [b"Content-Disposition: " + disposition.encode("latin-1")]
        if draw(st.booleans()):
            headers.append(b"Content-Type: " + draw(st.sampled_from([b"image/png", b"application/octet-stream", b"text/plain", b"x"])))
        if draw(st.booleans()):
            headers = draw(st.permutations(headers + [b"X-" + draw(st.binary(max_size=20)).replace(b"\r", b"").replace(b"\n", b"")]))
        parts.append(b"--" + boundary.encode() + eol + eol.join(headers) + eol + eol + payload + eol)
    body = draw(st.binary(max_size=20)) + b"".join(parts)
    if draw(st.booleans()):
        body += b"--" + boundary.encode() + b"--" + eol
    if draw(st.integers(0, 4)) == 0:
        body = body[: draw(st.integers(0, len(body)))]
    header_boundary = draw(st.sampled_from([boundary, boundary, f'"{boundary}"', "other", ""]))
    content_type = "multipart/form-data" + (f"; boundary={header_boundary}" if header_boundary else "")
    content_type += draw(st.sampled_from(["", "", "; charset=utf-8", "; charset=latin-1", "; charset=nonsense", ";;"]))
    return content_type, body


@given(request=multipart_bodies())
@fuzz_settings(80)
def test_random_multipart_bodies(client: httpx.Client, request: tuple[str, bytes]) -> None:
    content_type, body = request
    r = post(client, "random_multipart", content=body, headers={"content-type": content_type})
    if r.status_code == 200:
        assert 1 <= len(r.json()["results"]) <= LIMITS["max_files"]


_MEDIA = [
    "application/json",
    "multipart/form-data",
    "application/x-www-form-urlencoded",
    "text/plain",
    "image/png",
    "application/octet-stream",
    "application/problem+json",
    "application/json; charset=utf-16",
    "",
    "*/*",
    "multipart/mixed",
]


def _fixed_bodies() -> list[bytes]:
    png = base64.b64encode(SEEDS[0])
    return [
        b"",
        b"{}",
        b"[]",
        b"null",
        b'{"images": null}',
        b'{"images": [""]}',
        b'{"images": ["====="]}',
        b'{"images": ["' + png + b'"], "filenames": []}',
        b'{"images": ["' + png + b'"], "x": 1}',
        b"[" * 10_000,
        b'{"images": ["' + b"A" * 300_000 + b'"]}',
    ]


@st.composite
def raw_bodies(draw: st.DrawFn) -> bytes:
    return draw(
        st.one_of(
            st.binary(max_size=2048),
            st.sampled_from(_fixed_bodies()),
            st.builds(json_images, st.lists(st.one_of(st.sampled_from(SEEDS), mutated_images()), max_size=6)),
        )
    )


def json_images(images: list[bytes]) -> bytes:
    return b'{"images": [' + b",".join(b'"' + base64.b64encode(i) + b'"' for i in images) + b"]}"


@given(media=st.one_of(st.sampled_from(_MEDIA), _LATIN1), body=raw_bodies())
@fuzz_settings(80)
def test_random_content_types_and_bodies(client: httpx.Client, media: str, body: bytes) -> None:
    value = media.encode("latin-1").strip()  # as any client library would send it
    r = post(client, "random_content_types", content=body, headers={"content-type": value} if value else {})
    if r.status_code == 200:
        assert 1 <= len(r.json()["results"]) <= LIMITS["max_files"]


# --- raw header values, straight into the ASGI app


@pytest.fixture(scope="module")
def asgi_app(tiny_checkpoint: Path) -> Iterator[tuple[FastAPI, BlockingPortal]]:
    """The app with its lifespan running on an event loop in a thread; requests are sent as raw ASGI."""
    app = create_app(settings_for(tiny_checkpoint, **LIMITS))
    with start_blocking_portal() as portal, portal.wrap_async_context_manager(app.router.lifespan_context(app)):
        end = time.monotonic() + 30
        while not app.state.runtime.readiness()[0]:
            assert time.monotonic() < end, "the app never became ready"
            time.sleep(0.02)
        yield app, portal


async def asgi_post(app: FastAPI, headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[int, dict[str, str], bytes]:
    """One raw ASGI request: any header bytes at all, the body in two chunks, then a disconnect after the reply."""
    chunks = [body[: len(body) // 2], body[len(body) // 2 :]]
    replied = asyncio.Event()
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if chunks:
            return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}
        await replied.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            replied.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/recognize",
        "raw_path": b"/recognize",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    await asyncio.wait_for(app(scope, receive, send), 30)
    start = next(m for m in sent if m["type"] == "http.response.start")
    reply_headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start.get("headers", [])}
    return start["status"], reply_headers, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


_HEADER_VALUE = st.binary(max_size=24).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
# Header values that look numeric to str methods but not to int()/float(): superscripts, fractions, NBSP, signs.
_NUMBERISH_PARTS = [b"0", b"1", b"9", b"\xb2", b"\xb3", b"\xb9", b"\xbc", b"\xa0", b" ", b"+", b"-", b"_", b".", b"e", b"nan", b"inf"]
_NUMBERISH = st.lists(st.sampled_from(_NUMBERISH_PARTS), max_size=6).map(b"".join)


@given(
    content_length=st.one_of(st.none(), _NUMBERISH, _HEADER_VALUE),
    content_type=st.one_of(st.sampled_from([b"multipart/form-data; boundary=B", b"application/json"]), _HEADER_VALUE),
    timeout=st.one_of(st.none(), _NUMBERISH, _HEADER_VALUE),
    as_json=st.booleans(),
)
@fuzz_settings(200)
def test_raw_header_values(
    asgi_app: tuple[FastAPI, BlockingPortal], content_length: bytes | None, content_type: bytes, timeout: bytes | None, as_json: bool
) -> None:
    app, portal = asgi_app
    if as_json:
        body = json_images([SEEDS[0]])
    else:
        body = b'--B\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n' + SEEDS[0] + b"\r\n--B--\r\n"
    headers = [(b"content-type", content_type)]
    if content_length is not None:
        headers.append((b"content-length", content_length))
    if timeout is not None:
        headers.append((b"x-request-timeout-ms", timeout))
    status, _, raw = portal.call(asgi_post, app, headers, body)
    TRIED["raw_headers_asgi"] += 1
    STATUSES[status] += 1
    # 504: a tiny but valid X-Request-Timeout-Ms can pass before the image is decoded.
    assert status in {200, 504} | CLIENT_ERRORS, (status, raw[:300])
    if status != 200:
        assert_error_json(httpx.Response(status, content=raw, headers={"content-type": "application/json"}))


# --- schemathesis against the app's own OpenAPI schema


#: Statuses that count as rejecting a schema-violating request: schemathesis's defaults plus
#: 413. A request may break the schema in one place (a boolean top_k) and a limit in another
#: (more files than max_files); the limit is checked first and answered 413, a rejection too.
_REJECTIONS = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]


@pytest.fixture(scope="module")
def openapi_schema(server: tuple[FastAPI, str]) -> Any:
    config = SchemathesisConfig.from_dict({"checks": {"negative_data_rejection": {"expected-statuses": _REJECTIONS}}})
    return schemathesis.openapi.from_dict(server[0].openapi(), config=config)


schema = schemathesis.pytest.from_fixture("openapi_schema")

#: 5xx replies that are documented and correct for a client's request: its own deadline passed.
_DOCUMENTED_5XX = {(504, "deadline_exceeded")}


def documented_reply(ctx: Any, response: Any, case: Any) -> bool:
    """Standard error JSON on every error; 5xx only where documented and caused by the request itself."""
    TRIED["schemathesis"] += 1
    STATUSES[response.status_code] += 1
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
        if response.status_code >= 500:
            assert (response.status_code, body["error"]["code"]) in _DOCUMENTED_5XX, (response.status_code, body)
    return True


@schema.parametrize()
@settings(max_examples=examples(60), deadline=None, suppress_health_check=list(HealthCheck))
def test_schemathesis(case: Any, server: tuple[FastAPI, str]) -> None:
    # positive_data_acceptance is left out: schema-valid bytes need not be an image (415/422 are right).
    # not_a_server_error is replaced by documented_reply: a client's own tiny X-Request-Timeout-Ms may give 504.
    case.call_and_validate(base_url=server[1], excluded_checks=[positive_data_acceptance, not_a_server_error], additional_checks=[documented_reply])


# --- afterwards: the server's own account


def test_server_is_healthy_and_never_answered_500(server: tuple[FastAPI, str], client: httpx.Client) -> None:
    # Runs last in this module: whatever came before, nothing 500'd, nothing is stuck, and it still serves.
    text = client.get("/metrics").text
    assert client.get("/readyz").status_code == 200
    assert_results(client.post("/recognize", files=[("files", ("ok.png", SEEDS[0], "image/png"))]), 1)
    assert metric(text, "safl_request_duration_seconds_count", status="500") == 0
    assert metric(text, "safl_errors_total", reason="internal_error") == 0
    assert metric(text, "safl_queue_depth") == 0 and metric(text, "safl_in_flight_requests") == 0
    assert metric(text, "safl_in_flight_crops") == 0 and metric(text, "safl_worker_restarts_total") == 0
    record_figures("fuzz", inputs_tried=sum(TRIED.values()), by_test=dict(TRIED), statuses=dict(sorted(STATUSES.items())), nasty_images=len(NASTY), http_500=0)
