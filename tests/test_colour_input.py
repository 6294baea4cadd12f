"""A colour (3-channel) checkpoint serves end to end: the shipped weights grown with
``grow --channels 3`` read colour crops through ``safl recognize`` (both engines, the ONNX
export included) and ``POST /recognize`` (``?debug=rectified`` too) as the grey model reads
them in grey."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont
from service_support import encode, expected, multipart, running_app, settings_for

from model.checkpoint import load_checkpoint
from model.preprocess import ViewConfig
from service.cli import main

SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "safl.safetensors"
WORDS = ["Coffee", "EXIT", "Station", "42.50"]
#: (text, background): colours whose luma differs clearly, so the grey model reads them.
COLOURS = [((200, 20, 20), (250, 240, 170)), ((255, 255, 255), (20, 90, 160)), ((20, 60, 20), (170, 220, 250)), ((250, 220, 0), (90, 20, 110))]


@pytest.fixture(scope="module")
def colour_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model.training.grow import main as grow_main

    out = tmp_path_factory.mktemp("colour") / "safl.safetensors"
    grow_main([str(SHIPPED), str(out), "--channels", "3"])
    return out


@pytest.fixture(scope="module")
def colour_files(any_faces: list) -> list[bytes]:
    """Coloured words as PNG files, drawn larger than the model input (the service resizes)."""
    font = ImageFont.truetype(any_faces[0].path, 40)
    files = []
    for word, (fg, bg) in zip(WORDS, COLOURS, strict=True):
        left, top, right, bottom = font.getbbox(word)
        img = Image.new("RGB", (right - left + 24, bottom - top + 16), bg)
        ImageDraw.Draw(img).text((12 - left, 8 - top), word, font=font, fill=fg)
        files.append(encode(img))
    return files


def _tsv(out: str) -> list[list[str]]:
    return [line.split("\t") for line in out.splitlines()]


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_safl_recognize_reads_colour_with_a_colour_checkpoint(
    backend: str, colour_checkpoint: Path, colour_files: list[bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = []
    for i, data in enumerate(colour_files):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(data)
    readings = {}
    for weights in (SHIPPED, colour_checkpoint):
        flags = ["--weights", str(weights), "--backend", backend, "--threads", "1", "--format", "jsonl"]
        assert main(["recognize", *map(str, paths), *flags]) == 0
        readings[weights] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    grey, colour = readings[SHIPPED], readings[colour_checkpoint]
    assert [r["text"] for r in grey] == WORDS  # the grey model reads them (in grey) ...
    assert [r["text"] for r in colour] == WORDS  # ... and the colour one in colour, the same
    # The grown checkpoint carries no calibration: its confidence is the raw one, which matches.
    assert all(abs(c["raw_confidence"] - g["raw_confidence"]) < 0.02 for c, g in zip(colour, grey, strict=True))


@pytest.mark.anyio
async def test_the_service_reads_colour_with_a_colour_checkpoint(colour_checkpoint: Path, colour_files: list[bytes]) -> None:
    model, _ = load_checkpoint(colour_checkpoint)
    want = expected(model, colour_files)
    async with running_app(settings_for(colour_checkpoint, max_batch_size=4)) as (_, client):
        info = (await client.get("/info")).json()
        r = await client.post("/recognize?debug=rectified", files=multipart(colour_files))
    assert info["input"] == {"height": 32, "width": 128, "channels": 3}
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["text"] for x in results] == [w.text for w in want] == WORDS
    # What the model read: an RGB picture at the input size, still in colour.
    picture = results[0]["rectified"]
    rectified = np.asarray(Image.open(io.BytesIO(base64.b64decode(picture.split(",", 1)[1]))))
    assert rectified.shape == (32, 128, 3) and np.ptp(rectified.astype(int) - rectified.mean(axis=-1, keepdims=True)) > 50


def test_views_of_a_colour_crop_stay_in_colour(colour_files: list[bytes]) -> None:
    from model.preprocess import PreprocessConfig, views

    tall = Image.open(io.BytesIO(colour_files[0])).rotate(90, expand=True)
    out = views(tall, PreprocessConfig(channels=3), ViewConfig(turn_tall=True, contrast=True))
    assert len(out) == 9 and all(v.shape == (32, 128, 3) and v.dtype == np.uint8 for v in out)
