"""bench/clean_text.py: the texts it draws, the crops it renders, its score and a real run with
the tiny checkpoint; and the held-out font families the synthetic renderer never uses."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from bench_support import load_bench
from PIL import Image

from model.charset import DEFAULT_CHARS
from model.training.fonts import HELD_OUT_FAMILIES, discover_fonts


@pytest.fixture(scope="module")
def clean_text():
    return load_bench("clean_text")


def test_training_never_sees_the_held_out_families(tmp_path: Path) -> None:
    def face(family: str) -> dict:
        return {"path": __file__, "family": family, "chars": DEFAULT_CHARS}

    cache = tmp_path / "fonts.json"
    cache.write_text(json.dumps([face("DejaVu Sans"), face("Liberation Sans"), face("Lato")]))
    assert [f.family for f in discover_fonts(DEFAULT_CHARS, cache=cache)] == ["DejaVu Sans"]
    assert {f.family for f in discover_fonts(DEFAULT_CHARS, cache=cache, families="held_out")} == {"Liberation Sans", "Lato"}
    assert len(discover_fonts(DEFAULT_CHARS, cache=cache, families="all")) == 3
    assert {"Liberation Sans", "Arimo", "Lato", "Carlito"} <= HELD_OUT_FAMILIES  # metric clones held out together
    with pytest.raises(ValueError, match="families"):
        discover_fonts(DEFAULT_CHARS, cache=cache, families="some")


def test_texts_fill_every_length_bucket_deterministically(clean_text, any_faces) -> None:
    samples = clean_text.draw_texts(4, seed=1, faces=any_faces)
    assert samples == clean_text.draw_texts(4, seed=1, faces=any_faces)
    assert samples != clean_text.draw_texts(4, seed=2, faces=any_faces)
    by_bucket = {}
    for s in samples:
        by_bucket.setdefault(s.bucket, []).append(s)
        assert 1 <= len(s.text) <= 25 and set(s.text) <= set(DEFAULT_CHARS)
    assert {k: len(v) for k, v in by_bucket.items()} == {"1-4": 4, "5-8": 4, "9-12": 4, "13-25": 4}
    assert [s.inverted for s in samples[:4]] == [False, True, False, True]


def test_crops_are_cut_at_the_ink_plus_the_margin(clean_text, any_faces) -> None:
    sample = clean_text.Sample("Station", any_faces[0].path, inverted=False)
    tight = np.asarray(Image.open(io.BytesIO(clean_text.render(sample, 0.0))))
    loose = np.asarray(Image.open(io.BytesIO(clean_text.render(sample, 0.4))))
    # Tight: ink touches every border. Loose: a band of background 40 % of the ink height.
    assert tight[0].min() < 255 and tight[-1].min() < 255 and tight[:, 0].min() < 255 and tight[:, -1].min() < 255
    m = round(0.4 * tight.shape[0])
    assert loose.shape == (tight.shape[0] + 2 * m, tight.shape[1] + 2 * m)
    assert loose[:m].min() == 255 and loose[:, :m].min() == 255 and loose[-m:].min() == 255
    inverted = np.asarray(Image.open(io.BytesIO(clean_text.render(clean_text.Sample("Station", any_faces[0].path, True), 0.4))))
    assert inverted[:m].max() == 0


def _luma(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def test_phrases_are_scored_with_their_spaces(clean_text, any_faces) -> None:
    phrases = clean_text.draw_texts(3, seed=1, faces=any_faces, phrases=True)
    assert len(phrases) == 9 and all(s.spaced and " " in s.text and s.text == " ".join(s.text.split()) for s in phrases)
    assert {s.bucket for s in phrases} == {"5-8", "9-12", "13-25"}
    assert clean_text.exact("Total:  $14.99 ", "Total: $14.99", spaced=True)
    assert not clean_text.exact("Total:$14.99", "Total: $14.99", spaced=True)  # what a word reader answers
    assert clean_text.exact("Total:$14.99", "Total: $14.99")  # words: spaces never count


def test_the_colour_subset_is_the_same_texts_in_weak_luma_strong_chroma_colours(clean_text, any_faces) -> None:
    grey = clean_text.draw_texts(2, seed=1, faces=any_faces)
    colour = clean_text.draw_texts(2, seed=1, faces=any_faces, colour=True)
    assert colour == clean_text.draw_texts(2, seed=1, faces=any_faces, colour=True)
    assert [(s.text, s.font, s.inverted) for s in colour] == [(s.text, s.font, s.inverted) for s in grey]
    assert all(s.colours is None for s in grey) and len({s.colours for s in colour}) == len(colour)
    for sample in colour:
        img = np.asarray(Image.open(io.BytesIO(clean_text.render(sample, 0.15))))
        assert img.ndim == 3 and img.shape[2] == 3
        fg, bg = sample.colours
        assert tuple(img[0, 0]) == bg and (img == fg).all(axis=-1).any()  # the background, and text in its colour
        y = _luma(img)
        assert np.ptp(y) <= 25  # hardly any contrast in grey (antialiasing mixes the two) ...
        assert np.linalg.norm((np.array(fg) - _luma(np.array(fg))) - (np.array(bg) - _luma(np.array(bg)))) >= 90  # ... clear in colour


def test_score_counts_exact_case_sensitive_readings(clean_text) -> None:
    samples = [clean_text.Sample(t, "", False) for t in ("Hello", "www.example.com", "42")]
    r = clean_text.score(samples, {0.0: ["Hello", "www.example.com", "42"], 0.4: ["hello", "www.exampIe.com", " 4 2 "]})
    assert r["per_margin"] == {"0": 1.0, "0.4": pytest.approx(1 / 3)}
    assert r["per_length"] == {"1-4": 1.0, "5-8": 0.5, "9-12": None, "13-25": 0.5}
    assert r["overall"] == pytest.approx(4 / 6) and r["targets_met"] is False


def test_a_run_with_the_tiny_model(clean_text, any_faces, tiny_checkpoint: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(clean_text, "discover_fonts", lambda charset, families="train": any_faces)
    out = tmp_path / "clean.json"
    flags = ["--weights", str(tiny_checkpoint), "--peers", "safl", "--threads", "1", "--json", str(out), "--no-progress"]
    predictions = tmp_path / "predictions.tsv"
    assert clean_text.main([*flags, "--per-bucket", "2", "--margins", "0", "0.4", "--predictions", str(predictions)]) == 0
    report = json.loads(out.read_text())
    rows = [line.split("\t") for line in predictions.read_text().splitlines()]
    assert rows[0] == ["margin", "label", "font", "inverted", "safl"] and len(rows) == 1 + 2 * 8
    assert [r[0] for r in rows[1:]] == ["0"] * 8 + ["0.4"] * 8
    assert report["texts"] == 8 and set(report["engines"]) == {"safl"}
    assert set(report["engines"]["safl"]["per_margin"]) == {"0", "0.4"}
    assert "| safl |" in capsys.readouterr().out
    rc = clean_text.main([*flags, "--per-bucket", "1", "--margins", "0", "--colour"])
    assert rc == 0 and json.loads(out.read_text())["colour"] is True
    assert "weak-luma colours" in capsys.readouterr().out


def test_no_held_out_fonts_is_one_line(clean_text, monkeypatch, capsys) -> None:
    monkeypatch.setattr(clean_text, "discover_fonts", lambda charset, families="train": [])
    assert clean_text.main(["--peers", "safl", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: none of the held-out font families") and len(err.strip().splitlines()) == 1
