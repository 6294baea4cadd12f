"""bench/curved_text.py: the arcs it renders and a real run with the tiny checkpoint."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from bench_support import load_bench
from PIL import Image


@pytest.fixture(scope="module")
def curved_text():
    return load_bench("curved_text")


def test_crops_bend_as_asked_with_the_margin_all_round(curved_text, any_faces) -> None:
    sample = curved_text.Sample("Roundabout", any_faces[0].path, inverted=False)
    straight = np.asarray(Image.open(io.BytesIO(curved_text.render(sample, 0.0, arch=True))))
    arch = np.asarray(Image.open(io.BytesIO(curved_text.render(sample, 90.0, arch=True))))
    valley = np.asarray(Image.open(io.BytesIO(curved_text.render(sample, 90.0, arch=False))))
    m = round(curved_text.MARGIN * 48)
    for crop in (straight, arch, valley):
        assert crop[:m].min() == 255 and crop[-m:].min() == 255 and crop[:, :m].min() == 255 and crop[:, -m:].min() == 255
        assert crop[m:-m, m:-m].min() == 0  # the ink reaches into the crop
    assert arch.shape[0] > 1.5 * straight.shape[0]
    # Ink in the middle columns: near the top for an arch, near the bottom for a valley.
    mid = slice(arch.shape[1] // 2 - 4, arch.shape[1] // 2 + 4)
    assert np.nonzero(arch[:, mid] < 128)[0].mean() < arch.shape[0] / 2 < np.nonzero(valley[:, mid] < 128)[0].mean()
    inverted = np.asarray(Image.open(io.BytesIO(curved_text.render(curved_text.Sample("Roundabout", any_faces[0].path, True), 30.0, arch=True))))
    assert inverted[:m].max() == 0
    assert [curved_text.is_arch(i) for i in range(6)] == [True, True, False, False, True, True]


def test_a_run_with_the_tiny_model(curved_text, any_faces, tiny_checkpoint: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    draw = curved_text.draw_texts  # the held-out families may be missing here (CI: DejaVu only)
    monkeypatch.setattr(curved_text, "draw_texts", lambda per_bucket, seed: draw(per_bucket, seed, faces=any_faces))
    out = tmp_path / "curved.json"
    rc = curved_text.main(
        [
            "--weights",
            str(tiny_checkpoint),
            "--peers",
            "safl",
            "--per-bucket",
            "2",
            "--arcs",
            "0",
            "90",
            "--yaws",
            "40",
            "--threads",
            "1",
            "--json",
            str(out),
            "--png",
            str(tmp_path / "arcs.png"),
            "--no-progress",
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["texts"] == 8 and set(report["engines"]) == {"safl"} and report["bar_met"] is None
    assert set(report["engines"]["safl"]["per_arc"]) == {"0", "90"} and set(report["engines"]["safl"]["perspective"]["per_yaw"]) == {"40"}
    said = capsys.readouterr().out
    assert "| safl |" in said and "yaw 40°" in said
    assert Image.open(tmp_path / "arcs.png").size[0] > 200


def test_a_turned_sign_shrinks_towards_its_far_end(curved_text, any_faces) -> None:
    sample = curved_text.Sample("IIIIIIIIIIII", any_faces[0].path, inverted=False)
    flat = np.asarray(Image.open(io.BytesIO(curved_text.render(sample, 0.0, arch=True))))
    turned = np.asarray(Image.open(io.BytesIO(curved_text.render(sample, 0.0, arch=True, yaw=50.0))))
    assert turned.shape[1] < 0.8 * flat.shape[1]  # foreshortened
    ink = turned < 128
    cols = np.nonzero(ink.any(axis=0))[0]
    height = lambda c: np.ptp(np.nonzero(ink[:, c])[0]) + 1  # noqa: E731
    assert height(cols[-2]) < 0.85 * height(cols[1])  # the far end is smaller
    with pytest.raises(ValueError, match="no face"):
        curved_text.turned(Image.new("L", (10, 10)), 90.0)


def test_arcs_out_of_range_are_a_usage_error(curved_text, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        curved_text.main(["--arcs", "400"])
    assert exc.value.code == 2 and "0-360" in capsys.readouterr().err


def test_no_engine_that_loads_is_exit_2(curved_text, any_faces, tmp_path: Path, monkeypatch, capsys) -> None:
    draw = curved_text.draw_texts
    monkeypatch.setattr(curved_text, "draw_texts", lambda per_bucket, seed: draw(per_bucket, seed, faces=any_faces))
    rc = curved_text.main(["--weights", str(tmp_path / "missing.safetensors"), "--peers", "safl", "--per-bucket", "1", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "safl: skipped" in err and "error: no engine could run" in err
