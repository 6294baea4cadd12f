"""The HTTP API through the real app, real decoding and the real tiny model."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from conftest import render_word
from PIL import Image
from pydantic import ValidationError
from service_support import assert_matches, encode, expected, metric, multipart, running_app, runtime_of, settings_for

from model import SAFL
from service import Settings

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _files() -> list[tuple[str, bytes]]:
    """One word per allowed format, in several modes and sizes."""
    return [
        ("hello.png", encode(render_word("hello"), "PNG")),
        ("World.jpg", encode(render_word("World", (200, 40), "RGB"), "JPEG", quality=90)),
        ("shop.webp", encode(render_word("shop", (96, 32), "RGB"), "WEBP", lossless=True)),
        ("exit.bmp", encode(render_word("EXIT", (128, 32)), "BMP")),
        ("street.tiff", encode(render_word("street", (160, 48), "RGB"), "TIFF")),
        ("cafe.gif", encode(render_word("cafe", (100, 30)).convert("P"), "GIF")),
        ("alpha.png", encode(render_word("open", (128, 32), "RGBA"), "PNG")),
    ]


async def test_single_file_matches_model(tiny_checkpoint: Path, tiny_model: SAFL) -> None:
    png = encode(render_word("hello"))
    async with running_app(settings_for(tiny_checkpoint)) as (app, client):
        r = await client.post("/recognize", files=multipart([png], ["hello.png"]))
        assert r.status_code == 200, r.text
        body = r.json()
        info = (await client.get("/info")).json()
    assert body["model"] == info["model"] and body["model"].startswith("safl-tiny@") and len(body["model"].split("@")[1]) == 12
    assert [x["filename"] for x in body["results"]] == ["hello.png"]
    assert_matches(body["results"], expected(tiny_model, [png]))


async def test_multi_file_all_formats_in_order(tiny_checkpoint: Path, tiny_model: SAFL) -> None:
    files = _files()
    async with running_app(settings_for(tiny_checkpoint, max_batch_size=4)) as (app, client):
        r = await client.post("/recognize", files=multipart([b for _, b in files], [n for n, _ in files]))
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == [n for n, _ in files]
    # 7 crops with max_batch_size 4: the request spans two batches and still comes back in order.
    assert_matches(results, expected(tiny_model, [b for _, b in files]))


async def test_json_base64_equals_multipart(tiny_checkpoint: Path, tiny_model: SAFL) -> None:
    files = [encode(render_word("json")), encode(render_word("base", (90, 30), "RGB"), "JPEG")]
    payload = {"images": [base64.b64encode(files[0]).decode(), "data:image/jpeg;base64," + base64.b64encode(files[1]).decode()]}
    async with running_app(settings_for(tiny_checkpoint)) as (app, client):
        r = await client.post("/recognize", json=payload)
        named = await client.post("/recognize", json={**payload, "filenames": ["a.png", "b.jpg"]})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == ["image-0", "image-1"]
    assert_matches(results, expected(tiny_model, files))
    assert [x["filename"] for x in named.json()["results"]] == ["a.png", "b.jpg"]


@pytest.mark.parametrize("turn_tall", [True, False])
async def test_a_vertical_sign_is_read_turned(memorised_checkpoint_without_tps: tuple[Path, list[str]], turn_tall: bool) -> None:
    checkpoint, words = memorised_checkpoint_without_tps
    # Each word once as it is and once written bottom to top, in a crop taller than wide.
    files = [encode(render_word(w)) for w in words] + [encode(render_word(w).transpose(Image.Transpose.ROTATE_90)) for w in words]
    async with running_app(settings_for(checkpoint, max_batch_size=4, turn_tall=turn_tall)) as (app, client):
        r = await client.post("/recognize", files=multipart(files))
    assert r.status_code == 200, r.text
    texts = [x["text"] for x in r.json()["results"]]
    assert texts[: len(words)] == words
    if turn_tall:
        assert texts[len(words) :] == words
    else:  # read as it stands, a sideways word is not the word
        assert texts[len(words) :] != words


@pytest.mark.parametrize(
    ("contrast_views", "confident_at", "reads_words", "inputs_per_crop"),
    [
        (True, 1.0, True, 3),  # every view of every crop
        (True, 0.6, True, 3),  # the default threshold: a faded crop reads unsure, so its contrast views are read too
        (True, 0.0, False, 1),  # every first reading counts as sure: no further views
        (False, 1.0, False, 1),
    ],
)
async def test_a_faded_crop_is_read_contrast_stretched(
    memorised_checkpoint: tuple[Path, list[str]], contrast_views: bool, confident_at: float, reads_words: bool, inputs_per_crop: int
) -> None:
    checkpoint, words = memorised_checkpoint
    # Grey on grey (levels 120..140): a washed-out photo of each word.
    files = [encode(render_word(w).point(lambda v: 120 + v * 20 // 255)) for w in words]
    settings = settings_for(checkpoint, contrast_views=contrast_views, views_confident_at=confident_at)
    async with running_app(settings) as (app, client):
        r = await client.post("/recognize", files=multipart(files))
        text = (await client.get("/metrics")).text
    assert r.status_code == 200, r.text
    answers = r.json()["results"]
    assert ([x["text"] for x in answers] == words) is reads_words
    assert metric(text, "safl_crops_recognized_total") == len(words) * inputs_per_crop


async def test_probes_info_metrics_docs(tiny_checkpoint: Path) -> None:
    settings = settings_for(tiny_checkpoint, max_batch_size=4, max_wait_ms=3.0, max_queue=50, max_files=8)
    async with running_app(settings) as (app, client):
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        assert (await client.get("/readyz")).json() == {"status": "ready"}
        info = (await client.get("/info")).json()
        await client.post("/recognize", files=multipart([encode(render_word("m"))]))
        m = await client.get("/metrics")
        docs = await client.get("/docs")
        spec = (await client.get("/openapi.json")).json()
    assert info["name"] == "safl-tiny" and len(info["sha256"]) == 64 and info["model"] == f"safl-tiny@{info['sha256'][:12]}"
    assert info["input"] == {"height": 32, "width": 128, "channels": 1}
    assert info["views"] == {"turn_tall": False, "contrast": False, "confident_at": 0.6}  # settings_for's ONE_VIEW
    assert info["device"] == "cpu" and info["precision"] == "float32" and info["threads"] == 1
    assert info["batching"] == {"max_batch_size": 4, "max_wait_ms": 3.0, "max_queue": 50, "timeout_ms": 10000.0}
    assert info["charset"] and info["limits"]["formats"] == ["PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"]
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    text = m.text
    assert metric(text, "safl_crops_recognized_total") == 1
    assert metric(text, "safl_request_duration_seconds_count", route="/recognize", status="200") == 1
    assert metric(text, "safl_model_info", name="safl-tiny", sha=info["sha256"][:12], device="cpu") == 1
    for name in ("safl_queue_wait_seconds_count", "safl_batch_size_count", "safl_inference_duration_seconds_count"):
        assert metric(text, name) >= 1, name
    for name in ("safl_queue_depth", "safl_in_flight_requests", "safl_errors_total", "safl_worker_restarts_total"):
        assert name in text
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    body = spec["paths"]["/recognize"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    result = spec["components"]["schemas"]["RecognitionResult"]["properties"]
    assert "exactly right" in result["confidence"]["description"] and "end-of-word" in result["raw_confidence"]["description"]


async def test_error_shape_for_routing_errors(tiny_checkpoint: Path) -> None:
    async with running_app(settings_for(tiny_checkpoint)) as (app, client):
        missing = await client.get("/nope")
        wrong_method = await client.get("/recognize")
        m = (await client.get("/metrics")).text
    assert missing.status_code == 404 and missing.json() == {"error": {"code": "not_found", "message": "Not Found"}}
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
    # Unknown paths share one label: scanners cannot create new series.
    assert metric(m, "safl_request_duration_seconds_count", route="unmatched", status="404") == 1


async def test_api_key(tiny_checkpoint: Path) -> None:
    png = encode(render_word("key"))
    async with running_app(settings_for(tiny_checkpoint, api_key="s3cret")) as (app, client):
        none = await client.post("/recognize", files=multipart([png]))
        wrong = await client.post("/recognize", files=multipart([png]), headers={"Authorization": "Bearer nope"})
        bearer = await client.post("/recognize", files=multipart([png]), headers={"Authorization": "Bearer s3cret"})
        header = await client.post("/recognize", files=multipart([png]), headers={"X-API-Key": "s3cret"})
        info = await client.get("/info")
        open_probes = [(await client.get(p)).status_code for p in ("/healthz", "/readyz", "/metrics")]
    assert none.status_code == 401 and none.json()["error"]["code"] == "unauthorized"
    assert none.headers["www-authenticate"] == "Bearer"
    assert wrong.status_code == 401 and info.status_code == 401
    assert bearer.status_code == 200 and header.status_code == 200
    assert open_probes == [200, 200, 200]

    locked = settings_for(tiny_checkpoint, api_key="s3cret", auth_health=True, auth_metrics=True)
    async with running_app(locked, ready=False) as (app, client):
        codes = [(await client.get(p)).status_code for p in ("/healthz", "/readyz", "/metrics")]
        with_key = [(await client.get(p, headers={"X-API-Key": "s3cret"})).status_code for p in ("/healthz", "/metrics")]
    assert codes == [401, 401, 401] and with_key == [200, 200]

    async with running_app(settings_for(tiny_checkpoint, api_key="")) as (app, client):  # empty: no key
        assert (await client.post("/recognize", files=multipart([png]))).status_code == 200


@pytest.mark.parametrize(("key", "said"), [(" \n", "no API key: /recognize answers anyone"), ("s3cret", "API key required on /recognize")])
async def test_the_start_says_whether_a_key_is_required(tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture, key: str, said: str) -> None:
    # A blank key (an empty Kubernetes Secret) turns authentication off: the log says so once.
    with caplog.at_level("INFO", logger="service"):
        async with running_app(settings_for(tiny_checkpoint, api_key=key)):
            pass
    assert sum(said in r.getMessage() for r in caplog.records) == 1


async def test_ambiguous_credentials_are_refused(tiny_checkpoint: Path) -> None:
    # With two Authorization headers the first one won: a wrong key was let in behind a right
    # one, and a right key refused behind a wrong one, depending on the order.
    png = encode(render_word("key"))
    right, wrong = ("Authorization", "Bearer s3cret"), ("Authorization", "Bearer nope")
    cases = {
        "right, wrong": [right, wrong],
        "wrong, right": [wrong, right],
        "bearer right, X-API-Key wrong": [right, ("X-API-Key", "nope")],
        "two X-API-Key": [("X-API-Key", "s3cret"), ("X-API-Key", "nope")],
        "right twice": [right, right],
        "right, and another scheme": [right, ("Authorization", "Basic dXNlcjpwdw==")],
    }
    # The key as `echo s3cret > file` writes it: the newline is dropped, not required.
    async with running_app(settings_for(tiny_checkpoint, api_key=" s3cret\n")) as (app, client):
        codes = {name: (await client.post("/recognize", files=multipart([png]), headers=headers)).status_code for name, headers in cases.items()}
    assert codes == {
        "right, wrong": 401,
        "wrong, right": 401,
        "bearer right, X-API-Key wrong": 401,
        "two X-API-Key": 401,
        "right twice": 200,
        "right, and another scheme": 200,
    }


def test_an_api_key_no_client_can_send_is_refused() -> None:
    assert Settings(api_key="s3cret\n").api_key.get_secret_value() == "s3cret"  # type: ignore[union-attr]
    assert Settings(api_key=" \n").api_key is None  # blank: no key, as the empty string
    for key, kind in (
        ("a\x01b", "a control character at position 2"),
        ("cl\u00e9", "a non-ASCII character at position 3"),
        ("a\u2028b", "a control character"),
    ):
        with pytest.raises(ValidationError, match=kind):
            Settings(api_key=key)


async def test_unexpected_server_error_is_a_bare_500(tiny_checkpoint: Path) -> None:
    async with running_app(settings_for(tiny_checkpoint), raise_app_exceptions=False) as (app, client):
        batcher = runtime_of(app).batcher
        assert batcher is not None

        def broken_submit(*args: object, **kwargs: object) -> None:
            raise ValueError("injected bug with a secret path /srv/x")

        batcher.submit = broken_submit  # type: ignore[method-assign,assignment]
        r = await client.post("/recognize", files=multipart([encode(render_word("x"))]))
        m = (await client.get("/metrics")).text
    assert r.status_code == 500
    assert r.json() == {"error": {"code": "internal_error", "message": "internal server error"}}
    assert metric(m, "safl_request_duration_seconds_count", route="/recognize", status="500") == 1
    assert metric(m, "safl_errors_total", reason="internal_error") == 1
