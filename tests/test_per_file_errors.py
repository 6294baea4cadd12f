"""Per-file errors (``per_file_errors``), misspelt options and the rectified view, over
real HTTP: a uvicorn server in a thread, Pillow decoding, the real tiny model."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from conftest import render_word
from PIL import Image
from service_support import encode, metric, multipart, running_app, serve_in_thread, settings_for

from model import load_checkpoint
from model.preprocess import ViewConfig, to_pixels, to_tensor, views
from service import create_app

LIMITS = {"max_files": 4, "max_file_bytes": 200_000, "max_body_bytes": 1_000_000, "max_pixels": 1_000_000}
_PNG = encode(render_word("ok"))


def _noise_png(size: tuple[int, int]) -> bytes:
    import numpy as np

    return encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0]), dtype=np.uint8)))


#: Files that fail on their own, each with the code it fails a whole request with.
BAD_FILES: dict[str, tuple[bytes, str]] = {
    "empty.png": (b"", "empty_file"),
    "notes.txt": (b"hello, world\n" * 10, "unsupported_image"),
    "cut.png": (_PNG[: len(_PNG) // 2], "corrupt_image"),
    "big.png": (_noise_png((600, 600)), "file_too_large"),
    "wide.png": (encode(Image.new("L", (1001, 1000), 255)), "too_many_pixels"),
    "lab.tiff": (encode(Image.new("LAB", (40, 20)), "TIFF"), "unsupported_image"),
}


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[str]:
    with serve_in_thread(create_app(settings_for(tiny_checkpoint, **LIMITS))) as url:
        yield url


def _post(server: str, path: str = "/recognize", **kwargs: Any) -> httpx.Response:
    return httpx.post(server + path, timeout=30, **kwargs)


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_a_bad_file_is_one_result_with_the_error_it_fails_a_request_with(server: str, name: str) -> None:
    data, code = BAD_FILES[name]
    whole = _post(server, files=multipart([data], [name]))
    assert whole.json()["error"]["code"] == code and whole.status_code >= 400
    before = httpx.get(server + "/metrics").text
    r = _post(server, files=multipart([_PNG, data, _PNG], ["a.png", name, "c.png"]), data={"per_file_errors": "true"})
    after = httpx.get(server + "/metrics").text
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == ["a.png", name, "c.png"]
    # The same code and message as the whole request's error, and no text to mistake for a reading.
    assert results[1] == {"filename": name, **whole.json()}
    assert "text" in results[0] and "text" in results[2] and results[0]["text"] == results[2]["text"]
    assert metric(after, "safl_errors_total", reason=code) == metric(before, "safl_errors_total", reason=code) + 1


def test_a_request_whose_every_file_fails_on_its_own_is_answered_even_when_debugging(server: str) -> None:
    # With ?debug=rectified and no crop left to read, the server once answered 500 (found by schemathesis).
    r = _post(server, params={"debug": "rectified"}, files=multipart([b"", b"hello"], ["empty.png", "notes.txt"]), data={"per_file_errors": "true"})
    assert r.status_code == 200, r.text
    assert [x["error"]["code"] for x in r.json()["results"]] == ["empty_file", "unsupported_image"]


def test_json_images_that_are_not_base64_or_not_images_are_per_file(server: str) -> None:
    good = base64.b64encode(_PNG).decode()
    body = {"images": [good, "%%%not base64%%%", base64.b64encode(b"plain text").decode(), good], "per_file_errors": True}
    results = _post(server, json=body).json()["results"]
    assert [x["filename"] for x in results] == ["image-0", "image-1", "image-2", "image-3"]
    assert [x.get("error", {}).get("code") for x in results] == [None, "invalid_base64", "unsupported_image", None]
    alone = _post(server, json={"images": body["images"][1:2], "filenames": ["image-1"]}).json()
    assert results[1]["error"] == alone["error"]


def test_a_plain_field_among_the_files_is_a_per_file_not_a_file(server: str) -> None:
    files = [("files", ("a.png", _PNG, "image/png")), ("files", (None, b"not-a-file")), ("files", ("c.png", _PNG, "image/png"))]
    results = _post(server, files=files, data={"per_file_errors": "1"}).json()["results"]
    assert len(results) == 3 and results[1]["filename"] == "file-1" and results[1]["error"]["code"] == "not_a_file"


@pytest.mark.parametrize(
    ("how", "expect_per_file"),
    [
        ({"params": {"per_file_errors": "true"}}, True),
        ({"data": {"per_file_errors": "TRUE"}}, True),
        ({"params": {"per_file_errors": "false"}}, False),
        ({"params": {"per_file_errors": "0"}, "data": {"per_file_errors": "false"}}, False),
        ({}, False),  # the server's default
    ],
)
def test_the_request_asks_in_the_query_or_the_body(server: str, how: dict[str, Any], expect_per_file: bool) -> None:
    r = _post(server, files=multipart([_PNG, b""], ["a.png", "empty.png"]), **how)
    if expect_per_file:
        assert r.status_code == 200 and r.json()["results"][1]["error"]["code"] == "empty_file"
    else:
        assert r.status_code == 422 and r.json()["error"]["code"] == "empty_file"


def test_the_server_default_and_a_request_that_says_otherwise(tiny_checkpoint: Path) -> None:
    with serve_in_thread(create_app(settings_for(tiny_checkpoint, per_file_errors=True, **LIMITS))) as url:
        default = _post(url, files=multipart([_PNG, b""], ["a.png", "empty.png"]))
        refused = _post(url, files=multipart([_PNG, b""], ["a.png", "empty.png"]), params={"per_file_errors": "false"})
        only_bad = _post(url, files=multipart([b"", b"x"], ["e.png", "x.png"]))
    assert default.status_code == 200 and [("error" in x) for x in default.json()["results"]] == [False, True]
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "empty_file"
    # Every file unreadable: still one result per file.
    assert only_bad.status_code == 200 and [x["error"]["code"] for x in only_bad.json()["results"]] == ["empty_file", "unsupported_image"]


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"files": multipart([_PNG, b""] * 3)}, 413, "too_many_files"),
        ({"files": multipart([_PNG, b""]), "data": {"top_k": "0"}}, 422, "invalid_option"),
        ({"files": multipart([_PNG, b""]), "data": {"per_file_errors": "yes please"}}, 422, "invalid_option"),
        ({"files": multipart([_PNG, b""]), "params": {"per_file_errors": "false"}}, 422, "invalid_option"),  # the body says true
        ({"files": multipart([_PNG]), "headers": {"X-Request-Timeout-Ms": "soon"}}, 422, "invalid_timeout"),
        ({"content": b"--xyz\r\nnonsense", "headers": {"content-type": "multipart/form-data"}}, 400, "malformed_multipart"),
    ],
    ids=["too_many_files", "bad_option", "bad_flag", "query_and_body_disagree", "bad_timeout", "malformed_body"],
)
def test_errors_of_the_request_as_a_whole_stay_whole(server: str, kwargs: dict[str, Any], status: int, code: str) -> None:
    kwargs = dict(kwargs)
    if "files" in kwargs:
        kwargs["data"] = {"per_file_errors": "true", **kwargs.get("data", {})}
    r = _post(server, **kwargs)
    assert r.status_code == status and r.json()["error"]["code"] == code, r.text


def test_the_request_pixel_budget_stays_whole(tiny_checkpoint: Path) -> None:
    tall = encode(Image.new("L", (1000, 1000), 255))
    with serve_in_thread(create_app(settings_for(tiny_checkpoint, **{**LIMITS, "max_request_pixels": 1_500_000}))) as url:
        r = _post(url, files=multipart([tall, tall, b""], ["a.png", "b.png", "e.png"]), data={"per_file_errors": "true"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_pixels" and "2 images" in r.json()["error"]["message"]


@pytest.mark.parametrize("field", ["allow_list", "topk", "lexicons", "perfile_errors"])
def test_a_misspelt_multipart_option_is_refused_naming_it_and_the_options(server: str, field: str) -> None:
    r = _post(server, files=multipart([_PNG]), data={field: "1"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_option"
    message = r.json()["error"]["message"]
    assert repr(field) in message and all(o in message for o in ("allowlist", "blocklist", "lexicon", "top_k", "per_file_errors"))


@pytest.mark.parametrize("key", ["allow_list", "topk", "lexicons", "perfile_errors"])
def test_a_misspelt_json_key_is_refused_naming_it_and_the_options(server: str, key: str) -> None:
    r = _post(server, json={"images": [base64.b64encode(_PNG).decode()], key: "1"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_option", r.text
    message = r.json()["error"]["message"]
    assert repr(key) in message and all(o in message for o in ("images", "filenames", "allowlist", "blocklist", "lexicon", "top_k", "per_file_errors"))


def test_the_json_body_takes_the_options_of_a_form() -> None:
    # One list of options for both bodies: the JSON schema's keys are the images, their names and OPTION_FIELDS.
    from service.schemas import RecognizeJSON
    from service.uploads import JSON_KEYS, OPTION_FIELDS

    assert tuple(RecognizeJSON.model_fields) == JSON_KEYS == ("images", "filenames", *OPTION_FIELDS)


def test_the_openapi_schema_describes_per_file_errors(server: str) -> None:
    spec = httpx.get(server + "/openapi.json").json()
    op = spec["paths"]["/recognize"]["post"]
    assert "per_file_errors" in op["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert "per_file_errors" in op["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert any(p["name"] == "per_file_errors" and p["in"] == "query" for p in op["parameters"])
    items = spec["components"]["schemas"]["RecognizeResponse"]["properties"]["results"]["items"]["anyOf"]
    assert {i["$ref"].rsplit("/", 1)[1] for i in items} == {"RecognitionResult", "FileError"}
    assert "text" not in spec["components"]["schemas"]["FileError"]["properties"]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_rectified_image_is_of_the_view_the_answer_came_from(memorised_checkpoint_without_tps: tuple[Path, list[str]], anyio_backend: str) -> None:
    checkpoint, words = memorised_checkpoint_without_tps
    sideways = render_word(words[0]).transpose(Image.Transpose.ROTATE_90)  # a vertical sign, read turned
    upright = render_word(words[1])
    settings = settings_for(checkpoint, turn_tall=True, views_confident_at=1.0)  # every view read: the most confident wins
    async with running_app(settings) as (_, client):
        r = await client.post("/recognize?debug=rectified", files=multipart([encode(sideways), encode(upright)]))
    assert r.status_code == 200, r.text
    got = r.json()["results"]
    model, info = load_checkpoint(checkpoint)
    cfg = ViewConfig(turn_tall=True, confident_at=1.0)
    for result, img in zip(got, (sideways, upright)):
        inputs = [to_tensor(v) for v in views(img, info.config.preprocess, cfg)]
        readings = model.recognize(torch.stack(inputs))
        best = max(range(len(readings)), key=lambda i: readings[i].confidence)
        assert result["text"] == readings[best].text
        shown = Image.open(io.BytesIO(base64.b64decode(result["rectified"].split(",", 1)[1])))
        want = to_pixels(model.rectify(inputs[best][None]))[0]
        assert shown.tobytes() == Image.fromarray(want).tobytes(), f"the rectified image is not of view {best}, the one answered from"
        assert (best > 0) is (img is sideways)  # the sideways word was answered from a turned view
