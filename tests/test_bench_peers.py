"""bench/peers.py on a tiny generated labels.tsv folder: safl end to end, the val split,
skipped peers, the report and the plot; the real peers only where they are installed."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from bench_support import load_bench
from conftest import render_word

from model import load_checkpoint
from model.training.evaluate import score
from model.training.split import split_indices, unseen_val_indices

WORDS = ["Hello", "exit", "42", "CAFE", "open 24", "sale!", "??", "Street"]


@pytest.fixture(scope="module")
def peers():
    return load_bench("peers")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A labels.tsv folder: PNG and JPEG crops of different sizes and modes, one label with nothing alphanumeric."""
    root = tmp_path_factory.mktemp("words")
    lines = []
    for i, w in enumerate(WORDS):
        name = f"{i:03d}.png" if i % 2 else f"{i:03d}.jpg"
        render_word(w, size=(40 + 14 * len(w), 24 + 4 * (i % 3)), mode="RGB" if i % 3 else "L").save(root / name)
        lines.append(f"{name}\t{w}")
    (root / "labels.tsv").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    return root


def test_safl_reads_through_the_service_path(peers, folder: Path, tiny_checkpoint: Path) -> None:
    data = peers.load_encoded_folder(folder, part="all")
    safl = peers.SaflPeer(tiny_checkpoint, [1, 3], threads=1)
    safl.load()
    results = peers.run_benchmark([data], [safl], progress=False)
    b1, b3 = results["safl"]
    # Same texts as the model reading the decoded images directly, at every batch size.
    model, _ = load_checkpoint(tiny_checkpoint)
    expected = [r.text for r in model.recognize_images([peers.decode_image(c) for c in data.crops])]
    assert b1.predictions[folder.name] == expected
    assert b3.predictions[folder.name] == expected
    assert b3.datasets[folder.name].mismatches_vs_batch1 == 0
    m = b1.datasets[folder.name]
    assert (m.n, m.acc36, m.acc_cs, m.one_minus_ned) == score(expected, data.labels)
    assert m.crops == len(WORDS) and m.n == len(WORDS) - 1  # "??" has nothing to score under the 36-char protocol
    assert m.seconds > 0 and m.crops_per_s > 0


def test_val_part_is_the_training_split(peers, folder: Path) -> None:
    val, train = split_indices(WORDS)
    assert peers.load_encoded_folder(folder, part="val").labels == [WORDS[i] for i in val]
    assert peers.load_encoded_folder(folder, part="train").labels == [WORDS[i] for i in train]
    assert peers.load_encoded_folder(folder, part="val", limit=1).labels == [WORDS[val[0]]]
    unseen = unseen_val_indices(WORDS)
    assert peers.load_encoded_folder(folder).labels == [WORDS[i] for i in unseen]  # the default part


def test_cli_report_skips_missing_peers(peers, folder: Path, tiny_checkpoint: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)  # no tesseract on PATH
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)  # import fails
    monkeypatch.setitem(sys.modules, "rapidocr", None)
    out_json, out_md, out_tsv = tmp_path / "peers.json", tmp_path / "peers.md", tmp_path / "predictions.tsv"
    rc = peers.main(
        [
            "--weights",
            str(tiny_checkpoint),
            "--data",
            str(folder),
            "--part",
            "all",
            "--batch-sizes",
            "2",
            "--threads",
            "1",
            "--json",
            str(out_json),
            "--markdown",
            str(out_md),
            "--predictions",
            str(out_tsv),
            "--no-progress",
        ]
    )
    assert rc == 0
    err = capsys.readouterr().err
    assert "tesseract: skipped" in err and "apt-get install tesseract-ocr" in err
    assert "rapidocr: skipped" in err and "bench/requirements.txt" in err
    report = json.loads(out_json.read_text())
    assert "rapidocr3: skipped" in err
    assert set(report["skipped"]) == {"tesseract", "rapidocr", "rapidocr3"}
    assert report["batch_sizes"] == [1, 2]  # batch 1 always runs
    s = report["summary"]["safl"]
    assert s["batch1"]["batch_size"] == 1 and s["best_batch_size"] in (1, 2)
    assert report["datasets"][0]["crops"] == len(WORDS)
    assert report["goals"]["evaluated"] is False
    md = out_md.read_text()
    assert "| dataset | n | safl | tesseract | rapidocr | rapidocr3 |" in md
    assert "**tesseract**: skipped" in md
    rows = [line.split("\t") for line in out_tsv.read_text(encoding="utf-8").splitlines()]
    assert rows[0] == ["dataset", "file", "label", "safl"]
    assert [r[2] for r in rows[1:]] == WORDS


def test_plot(peers, folder: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "peers.png"
    load = tmp_path / "load.json"
    rows = [
        {"label": lab, "concurrency": c, "p50_ms": 10.0 * c, "p95_ms": 20.0 * c, "p99_ms": 30.0 * c} for lab in ("batch 1 (off)", "batch 8") for c in (1, 4)
    ]
    load.write_text(json.dumps({"argv": [], "results": rows}))
    rc = peers.main(
        [
            "--weights",
            str(tiny_checkpoint),
            "--data",
            str(folder),
            "--limit",
            "2",
            "--peers",
            "safl",
            "--batch-sizes",
            "1",
            "--threads",
            "1",
            "--plot",
            str(png),
            "--service-load",
            str(load),
            "--no-progress",
        ]
    )
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(shutil.which("tesseract") is None, reason="tesseract not installed (apt-get install tesseract-ocr tesseract-ocr-eng)")
def test_tesseract_reads_rendered_words(peers, folder: Path) -> None:
    data = peers.load_encoded_folder(folder, part="all", limit=3)
    tess = peers.TesseractPeer(threads=1, psms=(8,))
    try:
        tess.load()
    except peers.PeerUnavailable as exc:
        pytest.skip(str(exc))
    try:
        (v,) = tess.variants()
        texts = v.run(data.crops, lambda k: None)
    finally:
        tess.close()
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert sum(t.lower() == w.lower() for t, w in zip(texts, data.labels)) >= 1  # clean black-on-white words


def test_rapidocr_reads_rendered_words(peers, folder: Path) -> None:
    pytest.importorskip("rapidocr_onnxruntime")
    data = peers.load_encoded_folder(folder, part="all", limit=4)
    rapid = peers.RapidOCRPeer([1, 4], threads=1)
    rapid.load()
    single, batched = rapid.variants()
    texts = single.run(data.crops, lambda k: None)
    assert batched.run(data.crops, lambda k: None) == texts
    assert sum(t.lower() == w.lower() for t, w in zip(texts, data.labels)) >= 2
    assert "intra_op_num_threads=1" in rapid.info()["threads"]


def test_rapidocr3_reads_rendered_words(peers, folder: Path) -> None:
    pytest.importorskip("rapidocr")
    data = peers.load_encoded_folder(folder, part="all", limit=4)
    rapid = peers.RapidOCR3Peer(threads=1)
    rapid.load()
    (single,) = rapid.variants()
    texts = single.run(data.crops, lambda k: None)
    assert sum(t.lower() == w.lower() for t, w in zip(texts, data.labels)) >= 2
    assert rapid.info()["engine"].startswith("rapidocr 3.")


def test_missing_weights_is_an_error_not_a_skip(peers, folder: Path, tmp_path: Path, capsys) -> None:
    rc = peers.main(["--weights", str(tmp_path / "none.safetensors"), "--data", str(folder), "--peers", "safl", "--no-progress"])
    assert rc == 2
    assert "weights not found" in capsys.readouterr().err
