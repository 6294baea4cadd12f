"""model.training.rectifier_report on real renders: an identity rectifier reports no warp."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model.charset import DEFAULT_CHARS
from model.training import rectifier_report
from model.training.fonts import discover_fonts


@pytest.fixture(scope="module")
def crops():
    if not discover_fonts(DEFAULT_CHARS, families="all"):
        pytest.skip("no fonts installed")
    return rectifier_report.render_words(6)


def test_kinds_hold_the_same_words(crops) -> None:
    assert set(crops) == set(rectifier_report.KINDS) and all(v.images.shape == (6, 32, 128) for v in crops.values())
    assert all(v.points.shape == (6, 20, 2) for v in crops.values())
    # The same word in the same place: straight crops and perspective ones differ by the warp alone.
    assert not np.array_equal(crops["straight"].images, crops["perspective"].images)


def test_an_identity_rectifier_reports_no_warp(crops, tiny_checkpoint: Path, tmp_path: Path) -> None:
    # The untrained tiny model's rectifier starts as the identity (zeroed last layer).
    report, outputs = rectifier_report.analyse(tiny_checkpoint, crops)
    for kind, v in report["kinds"].items():
        assert v["offset"] < 1e-5 and v["spread"] < 1e-5 and v["outside"] == 0.0
        assert v["point_error"] > 0.05  # the identity is not where bent or framed text's edges lie
        assert v["edge_bend"] < 1e-6  # the identity's edges are straight
        assert outputs[kind].shape == (6, 32, 128)
    # The renderer's own edges: straight on straight text, bowed on curved text.
    assert report["kinds"]["straight"]["truth_bend"] < 1e-3 < 0.02 < report["kinds"]["curved"]["truth_bend"]
    assert report["kinds"]["arc"]["truth_bend"] > 0.02
    assert report["kinds"]["curved"]["bend_response"] < 1e-5 and report["kinds"]["arc"]["bend_response"] < 1e-5
    out = tmp_path / "r.json"
    assert rectifier_report.main([str(tiny_checkpoint), "--n", "3", "--json", str(out)]) == 0
    assert set(json.loads(out.read_text())["models"]) == {"safl-tiny@" + report["model"].split("@")[1]}
