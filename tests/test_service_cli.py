"""The ``safl`` command: recognize, serve's settings and start-up errors, mounted training commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import render_word
from PIL import Image
from service_support import encode, expected

from model import SAFL
from model.preprocess import ViewConfig
from service.cli import build_parser, main, settings_from_args
from service.settings import DEFAULT_WEIGHTS, Settings


@pytest.fixture
def word_files(tmp_path: Path) -> list[Path]:
    paths = []
    for name, img, fmt in [("a.png", render_word("hello"), "PNG"), ("b.jpg", render_word("World", (180, 40), "RGB"), "JPEG")]:
        p = tmp_path / name
        p.write_bytes(encode(img, fmt))
        paths.append(p)
    return paths


def test_recognize_prints_file_text_confidence(tiny_checkpoint: Path, tiny_model: SAFL, word_files: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["recognize", *map(str, word_files), "--weights", str(tiny_checkpoint), "--device", "cpu", "--threads", "1"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    want = expected(tiny_model, [p.read_bytes() for p in word_files], ViewConfig())  # every view: the CLI's default
    assert len(out) == 2
    for line, path, ref in zip(out, word_files, want, strict=True):
        name, text, conf = line.split("\t")
        assert name == str(path) and text == ref.text
        assert float(conf) == pytest.approx(ref.confidence, rel=1e-4, abs=1e-30)


def test_recognize_turns_tall_crops_unless_told_not_to(
    memorised_checkpoint_without_tps: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint, words = memorised_checkpoint_without_tps
    paths = []
    for i, w in enumerate(words):
        paths.append(tmp_path / f"{i}.png")
        render_word(w).transpose(Image.Transpose.ROTATE_270).save(paths[-1])  # top to bottom
    common = [*map(str, paths), "--weights", str(checkpoint), "--device", "cpu", "--threads", "1"]
    for flags, want_words in ([], True), (["--no-turn-tall"], False), (["--contrast-views"], True):
        assert main(["recognize", *common, *flags]) == 0
        texts = [line.split("\t")[1] for line in capsys.readouterr().out.splitlines()]
        assert (texts == words) is want_words


def test_recognize_json_and_bad_files(tiny_checkpoint: Path, word_files: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    rc = main(["recognize", str(word_files[0]), str(bad), str(tmp_path / "missing.png"), "--weights", str(tiny_checkpoint), "--json"])
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert rc == 1
    assert doc["model"].startswith("safl-tiny@")
    # One result per file in order, an unreadable one in the HTTP API's per-file error shape.
    assert [r["filename"] for r in doc["results"]] == [str(word_files[0]), str(bad), str(tmp_path / "missing.png")]
    assert set(doc["results"][0]) == {"filename", "text", "confidence", "raw_confidence", "char_confidences"}
    assert [set(r) for r in doc["results"][1:]] == [{"filename", "error"}] * 2 and set(doc) == {"model", "results"}
    assert [r["error"]["code"] for r in doc["results"][1:]] == ["unsupported_image", "unreadable"]
    assert "notes.txt" in captured.err and "missing.png" in captured.err


def test_missing_weights_fail_with_a_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "weights" / "safl.safetensors"
    assert main(["serve", "--weights", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "--weights" in err and "SAFL_WEIGHTS" in err
    assert main(["recognize", "x.png", "--weights", str(missing)]) == 2


def test_serve_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFL_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("SAFL_MAX_WAIT_MS", "9")
    monkeypatch.setenv("SAFL_API_KEY", "from-env")
    args = build_parser().parse_args(["serve", "--max-wait-ms", "3", "--no-warmup", "--port", "9001", "--threads", "2"])
    s = settings_from_args(args)
    assert (s.max_batch_size, s.max_wait_ms, s.warmup, s.port, s.threads) == (7, 3.0, False, 9001, 2)
    assert s.api_key is not None and s.api_key.get_secret_value() == "from-env"
    assert s.weights == DEFAULT_WEIGHTS


def test_invalid_settings_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--max-files", "500", "--max-queue", "10"]) == 2
    assert "max_files" in capsys.readouterr().err
    # By default a tall crop queues 3 model inputs (turned each way); with every view on, 9.
    assert main(["serve", "--max-files", "10", "--max-queue", "20"]) == 2
    assert "max_files (10) x 3 views cannot exceed max_queue (20)" in capsys.readouterr().err
    assert main(["serve", "--max-files", "10", "--max-queue", "80", "--contrast-views"]) == 2
    assert "max_files (10) x 9 views cannot exceed max_queue (80)" in capsys.readouterr().err
    assert Settings(max_files=10, max_queue=30, turn_tall=False).max_queue == 30
    assert Settings(max_files=10, max_queue=10, turn_tall=False, contrast_views=False).max_queue == 10


def test_training_subcommands_are_mounted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    parser = build_parser()
    assert parser.parse_args(["synth", "--count", "10"]).count == 10
    assert parser.parse_args(["train", "--preset", "tiny"]).preset == "tiny"
    assert parser.parse_args(["eval", "--data", "d"]).weights == DEFAULT_WEIGHTS
    monkeypatch.setenv("SAFL_WEIGHTS", str(tmp_path / "w.safetensors"))
    assert build_parser().parse_args(["eval", "--data", "d"]).weights == tmp_path / "w.safetensors"


def test_serving_imports_none_of_the_training_stack() -> None:
    # `safl serve` and `safl --help` must start without the train extra's packages and
    # without the trainer, datasets, renderer or evaluation modules.
    probe = (
        "import sys, service.cli; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fontTools', 'wordfreq', 'lmdb', 'rapidfuzz') "
        "or m in ('model.training.train', 'model.training.data', 'model.training.evaluate', 'model.training.synth', 'model.training.stream')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout


def test_bad_training_settings_are_refused_before_any_data_loads(tmp_path: Path) -> None:
    from model.training.config import TrainConfig

    with pytest.raises(ValueError, match="--real-ratio must be between 0 and 1.*--lr must be positive|--lr must be positive.*--real-ratio"):
        TrainConfig(real_ratio=1.5, lr=0)
    out = subprocess.run(
        [sys.executable, "-m", "service", "train", "--out", str(tmp_path / "r"), "--synth", "does-not-exist", "--lr", "-1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and out.stderr.strip() == "safl train: --lr must be positive, got -1.0", out.stderr


def test_serve_caps_malloc_arenas_unless_the_environment_says(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from service.cli import limit_malloc_arenas

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False  # the operator's setting wins
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    if sys.platform.startswith("linux") and os.path.exists("/lib/x86_64-linux-gnu/libc.so.6"):
        assert limit_malloc_arenas() is True  # glibc: mallopt(M_ARENA_MAX) took
