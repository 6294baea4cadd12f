"""model.training.ship: a candidate that reads more of the validation part ships, calibrated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import render_word

from model.calibration import read_calibration
from model.checkpoint import read_info
from model.training import ship


@pytest.fixture
def val_folder(tmp_path: Path, memorised_checkpoint: tuple[Path, list[str]]) -> Path:
    """The memorised words (read right) and words it never saw (read wrong), one crop each."""
    _, words = memorised_checkpoint
    folder = tmp_path / "val"
    folder.mkdir()
    labels = (words * 3) + ["quartz", "jumble", "vortex", "glyph", "sphinx", "oxbow", "fjord", "kiwi"]
    for i, w in enumerate(labels):
        render_word(w).save(folder / f"{i:03d}.png")
    (folder / "labels.tsv").write_text("".join(f"{i:03d}.png\t{w}\n" for i, w in enumerate(labels)))
    return folder


def _ship(candidate: Path, val: Path, weights: Path) -> int:
    # Every crop of the toy folder in the validation part (blocks of one crop).
    return ship.main(
        [str(candidate), "--val", str(val), "--weights", str(weights), "--part", "val", "--val-fraction", "1.0", "--split-block", "1", "--threads", "1"]
    )


def test_a_candidate_ships_with_a_calibration_of_its_own(tmp_path: Path, memorised_checkpoint, val_folder: Path, capsys) -> None:
    weights = tmp_path / "weights" / "safl.safetensors"  # nothing shipped yet: the candidate ships
    rc = _ship(memorised_checkpoint[0], val_folder, weights)
    assert rc == 0
    said = capsys.readouterr()
    assert "shipped safl-memorised@" in said.out and "wrote the calibration" in said.out
    assert read_info(weights).model_id.startswith("safl-memorised@")
    calibration = read_calibration(weights)
    assert calibration is not None and "val" in calibration.fitted_on
    assert json.loads((weights.parent / "metrics.json").read_text())["model"] == read_info(weights).model_id


def test_a_calibration_that_cannot_be_fitted_leaves_a_working_raw_model_and_says_so(tmp_path: Path, memorised_checkpoint, capsys) -> None:
    _, words = memorised_checkpoint
    folder = tmp_path / "val"
    folder.mkdir()
    for i, w in enumerate(words):  # every crop read right: nothing to fit
        render_word(w).save(folder / f"{i}.png")
    (folder / "labels.tsv").write_text("".join(f"{i}.png\t{w}\n" for i, w in enumerate(words)))
    weights = tmp_path / "weights" / "safl.safetensors"
    rc = _ship(memorised_checkpoint[0], folder, weights)
    assert rc == 0 and read_calibration(weights) is None
    assert "warning: no calibration fitted" in capsys.readouterr().err
