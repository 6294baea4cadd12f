"""The HTTP contract: never a 200 with fewer results than image parts sent, deadlines that
hold in every stage, one table of error codes, and documented behaviour that is true.

Over the ASGI transport with the real tiny model; bodies are built by hand where a
client library would not send them (cut short, compressed, uploaded slowly).
"""

from __future__ import annotations

import asyncio
import gzip
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import render_word
from PIL import Image
from service_support import encode, running_app, settings_for

from model.preprocess import canonicalize
from service.errors import ERRORS, APIError


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


_PNG = encode(render_word("ok"))
BOUNDARY = "b0undary42"
CONTENT_TYPE = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def _part(field: str, filename: str, data: bytes) -> bytes:
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\nContent-Type: image/png\r\n\r\n'
    return head.encode() + data + b"\r\n"


def _body(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def _code(reply: httpx.Response) -> str:
    return reply.json()["error"]["code"]


@pytest.mark.anyio
async def test_a_multipart_body_cut_before_its_closing_boundary_is_refused(tiny_checkpoint: Path) -> None:
    whole = _body(_part("files", "a.png", _PNG), _part("files", "b.png", _PNG))
    closing = f"--{BOUNDARY}--\r\n".encode()
    async with running_app(settings_for(tiny_checkpoint)) as (_, client):
        reply = await client.post("/recognize", content=whole, headers=CONTENT_TYPE)
        assert reply.status_code == 200 and [r["filename"] for r in reply.json()["results"]] == ["a.png", "b.png"]
        one_part = _body(_part("files", "a.png", _PNG))
        for cut in (whole[: -len(closing)], whole[:-200], one_part[: -len(closing)], one_part[:-8]):
            reply = await client.post("/recognize", content=cut, headers=CONTENT_TYPE)
            assert reply.status_code == 400, reply.text
            assert _code(reply) == "malformed_multipart" and "closing boundary" in reply.json()["error"]["message"]


@pytest.mark.anyio
async def test_file_is_an_alias_of_files_and_other_file_fields_are_refused(tiny_checkpoint: Path) -> None:
    async with running_app(settings_for(tiny_checkpoint)) as (_, client):
        body = _body(_part("files", "a.png", _PNG), _part("file", "b.png", _PNG), _part("files", "c.png", _PNG))
        reply = await client.post("/recognize", content=body, headers=CONTENT_TYPE)
        assert reply.status_code == 200
        assert [r["filename"] for r in reply.json()["results"]] == ["a.png", "b.png", "c.png"]

        reply = await client.post("/recognize", content=_body(_part("files", "a.png", _PNG), _part("image", "b.png", _PNG)), headers=CONTENT_TYPE)
        assert reply.status_code == 422 and _code(reply) == "unexpected_file" and "'image'" in reply.text


@pytest.mark.anyio
async def test_a_part_with_only_an_encoded_filename_is_explained(tiny_checkpoint: Path) -> None:
    part = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; filename*=UTF-8''w%C3%B6rd.png\r\n\r\n").encode() + _PNG + b"\r\n"
    async with running_app(settings_for(tiny_checkpoint)) as (_, client):
        reply = await client.post("/recognize", content=_body(part), headers=CONTENT_TYPE)
        assert reply.status_code == 422 and _code(reply) == "not_a_file"
        assert "filename*=" in reply.json()["error"]["message"]
        long_name = _body(_part("files", "a" * 5000 + ".png", _PNG))
        reply = await client.post("/recognize", content=long_name, headers=CONTENT_TYPE)
        assert reply.status_code == 400 and "header size" in reply.json()["error"]["message"]


@pytest.mark.anyio
async def test_a_compressed_body_is_refused_naming_its_coding(tiny_checkpoint: Path) -> None:
    async with running_app(settings_for(tiny_checkpoint)) as (_, client):
        for body, media in ((_body(_part("files", "a.png", _PNG)), CONTENT_TYPE["content-type"]), (b'{"images": []}', "application/json")):
            reply = await client.post("/recognize", content=gzip.compress(body), headers={"content-type": media, "content-encoding": "gzip"})
            assert reply.status_code == 415 and _code(reply) == "unsupported_content_encoding" and "'gzip'" in reply.text


@pytest.mark.anyio
async def test_the_request_pixel_budget_is_checked_before_decoding(tiny_checkpoint: Path) -> None:
    white = encode(Image.new("L", (1000, 1000), 255))
    settings = settings_for(tiny_checkpoint, max_pixels=1_000_000, max_request_pixels=2_500_000)
    async with running_app(settings) as (_, client):
        assert (await client.post("/recognize", files=[("files", (f"{i}.png", white)) for i in range(2)])).status_code == 200
        reply = await client.post("/recognize", files=[("files", (f"{i}.png", white)) for i in range(3)])
        assert reply.status_code == 413 and _code(reply) == "too_many_pixels" and "3000000" in reply.text


@pytest.mark.anyio
async def test_the_deadline_holds_while_images_decode(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each image's decode made to take 100 ms (as a large PNG does): 20 of them would take
    # 2 s, and a 300 ms deadline must stop decoding near 300 ms, naming the stage.
    import service.images

    real_load = service.images._load

    def slow_load(img: Image.Image, filename: str) -> Image.Image:
        time.sleep(0.1)
        return real_load(img, filename)

    monkeypatch.setattr(service.images, "_load", slow_load)
    async with running_app(settings_for(tiny_checkpoint, max_files=20, max_queue=64)) as (_, client):
        files = [("files", (f"{i}.png", _PNG)) for i in range(20)]
        started = time.monotonic()
        reply = await client.post("/recognize", files=files, headers={"X-Request-Timeout-Ms": "300"})
        elapsed = time.monotonic() - started
    assert reply.status_code == 504 and _code(reply) == "deadline_exceeded"
    message = reply.json()["error"]["message"]
    assert "decoded" in message and "300 ms" in message, message
    assert elapsed < 1.2, elapsed  # decoding all 20 would take 2 s


@pytest.mark.anyio
async def test_a_slow_upload_past_its_deadline_is_blamed_on_the_upload(tiny_checkpoint: Path) -> None:
    body = _body(_part("files", "a.png", _PNG))

    async def trickle() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 64):
            await asyncio.sleep(0.05)
            yield body[i : i + 64]

    async with running_app(settings_for(tiny_checkpoint)) as (_, client):
        reply = await client.post("/recognize", content=trickle(), headers={**CONTENT_TYPE, "X-Request-Timeout-Ms": "200"})
    assert reply.status_code == 504 and "while the body was being received" in reply.json()["error"]["message"]


@pytest.mark.anyio
async def test_retry_after_comes_with_the_codes_that_a_retry_can_cure(tiny_checkpoint: Path) -> None:
    async with running_app(settings_for(tiny_checkpoint, retry_after_s=7)) as (app, client):
        app.state.runtime.draining = True
        reply = await client.post("/recognize", files=[("files", ("a.png", _PNG))])
        assert reply.status_code == 503 and _code(reply) == "shutting_down" and reply.headers["retry-after"] == "7"
        app.state.runtime.draining = False
        missing = await client.get("/nowhere")
        assert missing.status_code == 404 and _code(missing) == "not_found" and "retry-after" not in missing.headers
        wrong = await client.delete("/recognize")
        assert wrong.status_code == 405 and _code(wrong) == "method_not_allowed"


def test_every_error_code_raised_in_the_service_is_in_the_table() -> None:
    source = "\n".join(p.read_text() for p in (Path(__file__).resolve().parents[1] / "service").glob("*.py"))
    raised = set(re.findall(r'(?:APIError|ImageRejected|CropFailed|error_response)\(\s*"([a-z_]+)"', source))
    assert raised and raised <= set(ERRORS), raised - set(ERRORS)
    from service.metrics import COMMON_ERRORS

    assert set(COMMON_ERRORS) <= set(ERRORS)
    with pytest.raises(KeyError):
        APIError("no_such_code", "a code outside the table cannot be raised")


def test_white_text_on_a_transparent_background_keeps_its_contrast() -> None:
    ink = np.asarray(render_word("light"), dtype=np.uint8) < 128  # True where the text is
    rgba = np.zeros((*ink.shape, 4), dtype=np.uint8)
    rgba[..., :3] = 255  # white everywhere; only the text is opaque
    rgba[..., 3] = np.where(ink, 255, 0)
    out = np.asarray(canonicalize(Image.fromarray(rgba, "RGBA")), dtype=np.float32)
    assert out[ink].mean() - out[~ink].mean() > 200  # light text on a dark backdrop
    rgba[..., :3] = 0  # black text on transparent: on white, as before
    out = np.asarray(canonicalize(Image.fromarray(rgba, "RGBA")), dtype=np.float32)
    assert out[~ink].mean() - out[ink].mean() > 200


@pytest.mark.anyio
async def test_the_api_docs_pages_load_their_assets_from_the_server(tiny_checkpoint: Path) -> None:
    # Offline (no CDN), /docs and /redoc must still render: every script and stylesheet they
    # reference is served by the app itself.
    async with running_app(settings_for(tiny_checkpoint)) as (_, client):
        for page in ("/docs", "/redoc"):
            html = (await client.get(page)).text
            assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', html)
            assert assets, html
            for url in assets:
                assert url.startswith("/"), f"{page} loads {url} from elsewhere"
                reply = await client.get(url)
                assert reply.status_code == 200 and len(reply.content) > 10_000, url


@pytest.mark.anyio
async def test_an_empty_multipart_body_has_no_files(tiny_checkpoint: Path) -> None:
    async with running_app(settings_for(tiny_checkpoint)) as (_, client):
        reply = await client.post("/recognize", content=b"", headers=CONTENT_TYPE)
    assert reply.status_code == 422 and _code(reply) == "no_files", reply.text


@pytest.mark.anyio
async def test_an_allowlist_holds_for_multipart_and_json_and_bad_lists_are_named(tiny_checkpoint: Path) -> None:
    import base64

    async with running_app(settings_for(tiny_checkpoint)) as (_, client):
        free = await client.post("/recognize", files=[("files", ("a.png", _PNG))])
        assert not set(free.json()["results"][0]["text"]) <= set("0123456789")  # this model reads letters unconstrained
        reply = await client.post("/recognize", files=[("files", ("a.png", _PNG))], data={"allowlist": "0123456789"})
        text = reply.json()["results"][0]["text"]
        assert reply.status_code == 200 and text and set(text) <= set("0123456789"), reply.text
        body = {"images": [base64.b64encode(_PNG).decode()], "allowlist": "abc", "blocklist": "c"}
        text = (await client.post("/recognize", json=body)).json()["results"][0]["text"]
        assert set(text) <= set("ab")
        bad = [({"allowlist": "12é"}, "'é'"), ({"allowlist": "ab", "blocklist": "ab"}, "leaves no character"), ({"blocklist": "x" * 1001}, "1001 characters")]
        for options, named in bad:
            reply = await client.post("/recognize", files=[("files", ("a.png", _PNG))], data=options)
            assert reply.status_code == 422 and _code(reply) == "invalid_option" and named in reply.text, reply.text


@pytest.mark.anyio
async def test_a_lexicon_top_k_and_the_rectified_image_over_http(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import base64
    import io

    one = [("files", ("a.png", _PNG))]
    async with running_app(settings_for(tiny_checkpoint)) as (_, client):
        plain = (await client.post("/recognize", files=one)).json()["results"][0]
        assert "alternatives" not in plain and "rectified" not in plain
        r = (await client.post("/recognize", files=one, data={"lexicon": "hello\r\nworld\n\nsafl\n", "top_k": "2"})).json()["results"][0]
        assert r["text"] in ("hello", "world", "safl") and [a["text"] for a in r["alternatives"]][0] == r["text"]
        assert len(r["alternatives"]) == 2 and r["alternatives"][0]["confidence"] >= r["alternatives"][1]["confidence"]
        body = {"images": [base64.b64encode(_PNG).decode()], "lexicon": ["12", "34"], "top_k": 1}
        r = (await client.post("/recognize", json=body)).json()["results"][0]
        assert r["text"] in ("12", "34") and [a["text"] for a in r["alternatives"]] == [r["text"]]
        reply = await client.post("/recognize?debug=rectified", files=one)
        url = reply.json()["results"][0]["rectified"]
        assert url.startswith("data:image/png;base64,")
        assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (128, 32)  # what the model read, at its input size
        bad = [
            ({"top_k": "0"}, "top_k must be 1 to 10"),
            ({"top_k": "11"}, "top_k must be 1 to 10"),
            ({"top_k": "two"}, "whole number"),
            ({"lexicon": "ok\ncafé"}, "'é'"),
            ({"lexicon": "x" * 26}, "at most 25"),
            ({"lexicon": "\n".join(f"w{i}" for i in range(1001))}, "the limit is 1000"),
            ({"lexicon": "\n".join(["same"] * 1001)}, "1001 words; the limit is 1000"),  # repeats count
            ({"lexicon": "12", "allowlist": "12"}, "cannot be combined"),
            ({"lexicon": " \n "}, "no word"),
        ]
        for options, named in bad:
            reply = await client.post("/recognize", files=one, data=options)
            assert reply.status_code == 422 and _code(reply) == "invalid_option" and named in reply.text, (options, reply.text)
        reply = await client.post("/recognize?debug=everything", files=one)
        assert reply.status_code == 422 and _code(reply) == "invalid_option" and "rectified" in reply.text
        reply = await client.post("/recognize?debg=rectified", files=one)  # a typo is an error, not ignored
        assert reply.status_code == 422 and _code(reply) == "invalid_option" and "'debg'" in reply.text
    words = tmp_path / "words.txt"
    words.write_text("alpha\nbeta\n", encoding="utf-8")
    async with running_app(settings_for(tiny_checkpoint, lexicon=words)) as (_, client):
        assert (await client.post("/recognize", files=one)).json()["results"][0]["text"] in ("alpha", "beta")  # the server's default lexicon
        own = (await client.post("/recognize", files=one, data={"lexicon": "gamma"})).json()["results"][0]["text"]
        assert own == "gamma"  # a request's own lexicon replaces it
        free = (await client.post("/recognize", files=one, data={"blocklist": "#"})).json()["results"][0]["text"]
        assert free not in ("alpha", "beta")  # an allowlist or blocklist reads without it


def test_crops_with_different_decode_options_share_one_batch(tiny_checkpoint: Path) -> None:
    from model.preprocess import preprocess
    from service.predictor import ModelInput, Predictor

    predictor = Predictor.load(tiny_checkpoint, "cpu", threads=1)
    crop = preprocess(render_word("ok"), predictor.preprocess_config)
    digits = predictor.decode_options(allowlist="0123456789")
    words = predictor.decode_options(lexicon=["hello", "world"])
    top3 = predictor.decode_options(top_k=3)
    alone = predictor.recognize([crop])[0]
    mixed = predictor.recognize([crop, ModelInput(crop, digits), ModelInput(crop), ModelInput(crop, words), ModelInput(crop, top3)])
    for same in (mixed[0], mixed[2]):  # as read alone, up to batch-size rounding
        assert same.text == alone.text and same.confidence == pytest.approx(alone.confidence, rel=1e-4)
    assert mixed[1].text and set(mixed[1].text) <= set("0123456789")
    assert mixed[3].text in ("hello", "world") and not mixed[3].alternatives
    assert len(mixed[4].alternatives) == 3 and mixed[4].alternatives[0].text == mixed[4].text
