"""The calibrated confidence (``model.calibration``): the fit, the sidecar round trip, one
application after the views are chosen, a constrained reading scored by the free model, and
the shipped checkpoint's calibration on its held-out part."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import render_word

from model import load_checkpoint
from model.calibration import Calibration, CalibrationError, calibrate, expected_calibration_error, read_calibration, reliability, write_calibration
from model.checkpoint import read_info
from model.preprocess import preprocess
from model.reading import Alternative, Recognition
from model.scoring import text_probabilities
from service.predictor import ModelInput, Predictor

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "weights" / "safl.safetensors"


def test_the_fit_recovers_a_known_map() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(0.001, 0.999, 20_000)
    truth = Calibration(1.5, 2.0)
    right = rng.random(len(p)) < truth(p)
    fitted = Calibration.fit(p, right)
    assert fitted.a == pytest.approx(1.5, abs=0.1) and fitted.b == pytest.approx(2.0, abs=0.1)
    assert expected_calibration_error(fitted(p), right) < 0.02
    assert expected_calibration_error(p, right) > 0.15  # the raw probability is not calibrated here
    with pytest.raises(ValueError, match="right and wrong"):
        Calibration.fit([0.2, 0.9], [True, True])


def test_ece_of_known_bins() -> None:
    # Two bins: 0.05 (1 of 2 right: gap 0.45) and 0.95 (2 of 2 right: gap 0.05) -> (2*0.45 + 2*0.05)/4
    rel = reliability([0.05, 0.05, 0.95, 0.95], [True, False, True, True])
    assert rel.counts[0] == 2 and rel.counts[9] == 2 and math.isnan(rel.accuracy[5])
    assert rel.ece == pytest.approx(0.25)


def test_calibrate_keeps_the_raw_probability_and_the_characters_consistent() -> None:
    cal = Calibration(1.5, 2.1)
    r = Recognition("EXIT", 0.4 * 0.9, [0.9, 0.8, 1.0, 0.5], (Alternative("EXIT", 0.36), Alternative("EXlT", 0.1)))
    out = calibrate(r, cal)
    assert out.raw_confidence == r.confidence and out.text == r.text
    assert out.confidence == pytest.approx(float(cal(0.36))) and out.confidence > 0.36
    eos = r.confidence / math.prod(r.char_confidences)
    power = math.log(out.confidence) / math.log(r.confidence)
    assert math.prod(out.char_confidences) * eos**power == pytest.approx(out.confidence)
    assert np.argsort(out.char_confidences).tolist() == np.argsort(r.char_confidences).tolist()
    assert out.alternatives[0].confidence == pytest.approx(out.confidence)
    # The other text: its share of what is left, as the model splits it among the other texts.
    assert out.alternatives[1].confidence == pytest.approx((1 - out.confidence) * 0.1 / (1 - 0.36))
    assert calibrate(out, cal) == out  # applying twice changes nothing
    plain = calibrate(r, None)
    assert plain.confidence == r.confidence and plain.raw_confidence == r.confidence


def test_alternatives_never_add_up_to_more_than_one() -> None:
    # A confident reading whose alternatives the model finds likely too: the map applied to
    # each (as before) gave 0.88 + 0.46 + 0.25 here.
    cal = Calibration(1.533, 1.962)
    alts = (Alternative("EXIT", 0.5), Alternative("exit", 0.2), Alternative("Exit", 0.12))
    out = calibrate(Recognition("EXIT", 0.5, [0.9, 0.9, 0.9, 0.7], alts), cal)
    confs = [a.confidence for a in out.alternatives]
    assert confs[0] == out.confidence > 0.8 and sum(confs) <= 1.0
    assert confs[1] == pytest.approx((1 - out.confidence) * 0.2 / 0.5) and confs[1] > confs[2]  # the model's order kept
    assert sum(float(cal(a.confidence)) for a in alts) > 1.5  # what the old rule claimed
    certain = calibrate(Recognition("EXIT", 1.0, [1.0] * 4, (Alternative("EXIT", 1.0), Alternative("EXlT", 0.0))), cal)
    assert certain.alternatives[1].confidence == 0.0


def test_a_constrained_reading_is_calibrated_from_the_free_models_probability() -> None:
    forced = Recognition("", 0.99, [], model_probability=1e-6)  # an allowlist without the word's letters
    out = calibrate(forced, Calibration(1.5, 2.1))
    assert out.raw_confidence == 0.99 and out.confidence < 0.01


def test_the_sidecar_round_trip_leaves_the_model_id(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "c.safetensors"
    shutil.copy(tiny_checkpoint, ckpt)
    shutil.copy(tiny_checkpoint.with_suffix(".json"), ckpt.with_suffix(".json"))
    before = read_info(ckpt)
    assert read_calibration(ckpt) is None  # a checkpoint without one reads as before
    cal = Calibration(1.25, 0.5, "test")
    write_calibration(ckpt, cal, {"ece": 0.01})
    assert read_calibration(ckpt) == cal
    assert read_info(ckpt).model_id == before.model_id
    meta = json.loads(ckpt.with_suffix(".json").read_text())
    meta["calibration"]["method"] = "isotonic"
    ckpt.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(CalibrationError, match="unknown calibration"):
        read_calibration(ckpt)
    write_calibration(ckpt, None)
    assert read_calibration(ckpt) is None


def test_teacher_forced_probability_is_the_greedy_one(memorised_checkpoint: tuple[Path, list[str]]) -> None:
    model, info = load_checkpoint(memorised_checkpoint[0])
    crops = torch.stack([preprocess(render_word(w), info.config.preprocess) for w in memorised_checkpoint[1][:3]])
    greedy = model.recognize(crops)
    scored = text_probabilities(model, crops, [r.text for r in greedy])
    assert scored == pytest.approx([r.confidence for r in greedy], rel=1e-4)


def test_the_shipped_model_calibrated_through_the_predictor() -> None:
    """The shipped sidecar's calibration reaches the predictor; a clean word reads sure, and
    the same word with digits only (an allowlist without its letters) reads unsure although
    its renormalised probability is high."""
    predictor = Predictor.load(SHIPPED, "cpu", threads=1, backend="torch")
    assert predictor.calibration is not None and predictor.info.model_id == read_info(SHIPPED).model_id
    crop = preprocess(render_word("HOTEL", (160, 40)), predictor.preprocess_config)
    free = calibrate(predictor.recognize([crop])[0], predictor.calibration)
    digits = predictor.decode_options("0123456789")
    forced_raw = predictor.recognize([ModelInput(crop, digits)])[0]
    forced = calibrate(forced_raw, predictor.calibration)
    assert free.text == "HOTEL" and free.confidence > 0.9
    assert forced.text != "HOTEL" and forced.confidence < 0.05 and forced.confidence < forced_raw.confidence / 100
