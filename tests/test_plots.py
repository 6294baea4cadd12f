"""model.training.plots: the pooled validation curve of a run and its plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from model.training.plots import main, pooled_curve


def _run(folder: Path, vals: list[tuple[int, int, int]], init: Path | None = None) -> Path:
    """A run folder as ``safl train`` leaves it: validations (step, IIIT5K right of 600, IC15
    right of 1,349), started from ``init`` (a checkpoint file) when given."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"init": None if init is None else str(init), "loss": "focal", "gamma": 2.0}))
    lines = [json.dumps({"step": 50, "images": 3200, "loss": 0.2})]
    for step, a, b in vals:
        sets = {"iiit5k-val": {"n": 600, "acc36": a / 600}, "ic15-val": {"n": 1349, "acc36": b / 1349}}
        lines.append(json.dumps({"step": step, "images": step * 64, "val": {**sets, "mean_acc36": (a / 600 + b / 1349) / 2}}))
    (folder / "log.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_the_curve_pools_crops_not_set_means(tmp_path: Path) -> None:
    run = _run(tmp_path / "r", [(0, 570, 950), (3000, 550, 900)])
    curve = pooled_curve(run)
    assert [i for i, _ in curve] == [0, 192000]
    # 1,520 of 1,949 crops: not the mean of the two sets (86.7 %)
    assert abs(curve[0][1] - 100 * 1520 / 1949) < 1e-9 and abs(curve[1][1] - 100 * 1450 / 1949) < 1e-9


def test_a_run_started_from_another_runs_checkpoint_starts_at_its_own_step_0(tmp_path: Path) -> None:
    parent = _run(tmp_path / "parent", [(0, 500, 800), (3000, 540, 880)])
    (parent / "best.json").write_text(json.dumps({"training": {"step": 3000, "images_seen": 192000}}))
    child = _run(tmp_path / "child", [(0, 540, 880), (3000, 560, 900)], init=parent / "best.safetensors")
    curve = pooled_curve(child)
    assert [i for i, _ in curve] == [0, 192000]  # not the parent's history, not counted from its start
    assert abs(curve[0][1] - 100 * 1420 / 1949) < 1e-9


def test_the_plateau_plot_is_drawn_and_a_bad_line_is_refused(tmp_path: Path, capsys) -> None:
    runs = [_run(tmp_path / n, [(0, 570, 950), (3000, 550, 900), (6000, 566, 960)]) for n in ("a", "b")]
    assert main(["--plateau", *map(str, runs), "--line", "shipped=78.0", "--out", str(tmp_path / "docs")]) == 0
    with Image.open(tmp_path / "docs" / "continuation_plateau.png") as im:
        assert im.width > 400 and im.height > 200
    with pytest.raises(SystemExit) as exc:
        main(["--plateau", str(runs[0]), "--line", "shipped", "--out", str(tmp_path / "docs")])
    assert exc.value.code == 2
    assert "LABEL=PERCENT" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--runs", str(runs[0]), "--line", "shipped=78.0", "--out", str(tmp_path / "docs")])
    assert "--plateau" in capsys.readouterr().err
