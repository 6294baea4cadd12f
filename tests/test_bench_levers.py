"""bench/torch_levers.py and bench/views_threshold.py on the tiny models: the variants read
what the model reads, and the views sweep reproduces the service's reading path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from bench_support import load_bench
from conftest import render_word

from model import load_checkpoint
from model.preprocess import ViewConfig
from model.reading import Recognition


@pytest.fixture(scope="module")
def levers():
    return load_bench("torch_levers")


@pytest.fixture(scope="module")
def sweep():
    return load_bench("views_threshold")


def test_fused_qkv_is_the_same_network(levers, memorised_checkpoint: tuple[Path, list[str]]) -> None:
    model, _ = load_checkpoint(memorised_checkpoint[0], torch.device("cpu"))
    fused = levers.fuse_qkv(model)
    x = torch.randn(3, 1, 32, 128)
    tokens = torch.randint(3, model.charset.vocab_size, (3, 6))
    with torch.no_grad():
        assert torch.allclose(fused(x, tokens), model(x, tokens), atol=1e-5)  # teacher-forced: every decoder position at once
    want = model.recognize(x)
    got = fused.recognize(x)  # the cached step path
    assert [r.text for r in got] == [r.text for r in want]
    assert [r.confidence for r in got] == pytest.approx([r.confidence for r in want], rel=1e-4)


def test_levers_reads_every_variant_and_compares_them(
    levers, memorised_checkpoint: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "levers.json"
    variants = ["torch", "torch fused-qkv", "torch int8", "onnx"]
    assert (
        levers.main(
            [
                "--weights",
                str(memorised_checkpoint[0]),
                "--limit",
                "8",
                "--batches",
                "1",
                "4",
                "--repeats",
                "1",
                "--threads",
                "1",
                "--json",
                str(out),
                "--variants",
                *variants,
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())["rows"]
    assert [(r["variant"], r["batch"]) for r in rows] == [(v, b) for v in variants for b in (1, 4)]
    by = {(r["variant"], r["batch"]): r for r in rows}
    assert by[("torch", 1)]["vs_torch"] == 1.0 and by[("onnx", 4)]["vs_onnx"] == 1.0
    assert by[("torch fused-qkv", 1)]["differ"] == 0 and by[("onnx", 1)]["differ"] == 0  # same readings as PyTorch eager
    assert "| torch int8 | 4 |" in capsys.readouterr().out


def _reading(text: str, confidence: float) -> Recognition:
    return Recognition(text, confidence, [confidence] * len(text))


def test_at_threshold_is_the_service_reading(sweep) -> None:
    # crop 0: sure; crop 1: unsure, a further view reads it better; crop 2: no further views
    readings = [[_reading("sure", 0.9), _reading("x", 0.95)], [_reading("bad", 0.3), _reading("good", 0.8), _reading("meh", 0.5)], [_reading("alone", 0.1)]]
    assert sweep.at_threshold(readings, 0.0) == (["sure", "bad", "alone"], 3)
    assert sweep.at_threshold(readings, 0.6) == (["sure", "good", "alone"], 5)
    assert sweep.at_threshold(readings, 1.0) == (["x", "good", "alone"], 6)


def test_views_threshold_on_a_folder(sweep, memorised_checkpoint: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint, words = memorised_checkpoint
    folder = tmp_path / "words"
    folder.mkdir()
    lines = []
    for i, w in enumerate(words * 4):
        render_word(w).save(folder / f"{i:03d}.png")
        lines.append(f"{i:03d}.png\t{w}")
    (folder / "labels.tsv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "sweep.json"
    args = ["--weights", str(checkpoint), "--data", str(folder), "--part", "all", "--thresholds", "0", "1", "--threads", "1", "--json", str(out)]
    assert sweep.main([*args, "--contrast-views"]) == 0
    doc = json.loads(out.read_text())
    rows = {r["confident_at"]: r for r in doc["rows"]}
    default = ViewConfig().confident_at
    assert set(rows) == {0.0, default, 1.0}
    assert rows[0.0]["inputs_per_crop"] == 1.0 and rows[1.0]["inputs_per_crop"] == 3.0  # the crop and its 2 contrast views
    assert rows[0.0]["right"] == len(lines)  # the memorised words, read from the crop alone
    assert len(doc["answers_at_default"]) == len(lines) and doc["contrast"] is True
    assert f"| {default} (default) |" in capsys.readouterr().out


def test_train_speed_times_each_variant(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    speed = load_bench("train_speed")
    out = tmp_path / "train_speed.json"
    labels = tmp_path / "labels.txt"
    labels.write_text("hello\nwww.example.com\n42\n")
    variants = ["bf16", "bf16 channels-last fused-adamw", "bf16 batch 32"]
    args = ["--preset", "tiny", "--labels", str(labels), "--batch-size", "8", "--warmup", "1", "--steps", "1", "--threads", "1", "--json", str(out)]
    assert speed.main([*args, "--variants", *variants]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["variant"], r["batch"]) for r in rows] == [("bf16", 8), ("bf16 channels-last fused-adamw", 8), ("bf16 batch 32", 32)]
    assert rows[0]["vs_bf16"] == 1.0 and all(r["images_per_s"] > 0 for r in rows)
    assert "| bf16 batch 32 | 32 |" in capsys.readouterr().out
