"""``model.training.resume.resolve``: the config a ``safl train`` invocation trains with, from
the saved config, the flags given and ``--resume`` (pure: no files, no training)."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import pytest

from model.training.config import FINETUNE_DEFAULTS, TrainConfig
from model.training.resume import ResumeRefused, read_saved, resolve, write_saved

#: A run as ``write_saved`` keeps it: started from --init with its own schedule, point loss on.
SAVED_RUN = replace(
    TrainConfig(),
    out="runs/b",
    init="runs/a/last.safetensors",
    synth=["data/synth"],
    lr=1.5e-4,
    warmup_steps=200,
    total_steps=24000,
    min_lr_ratio=0.05,
    tps_lr_scale=1.0,
    point_loss=1.0,
    threads=1,
    max_minutes=30.0,
    stop_at_step=900,
)
SAVED = {**asdict(SAVED_RUN), "world_size": 1}


def test_a_fresh_run_is_the_defaults_and_the_flags_given() -> None:
    run = resolve(None, {"out": "runs/x", "lr": 1e-3}, resume=False, has_state=False)
    assert run.config == replace(TrainConfig(), out="runs/x", lr=1e-3)
    assert not run.resumes and not run.finetune and not run.rewrite_saved


def test_a_fresh_run_from_init_takes_the_fine_tune_recipe_where_no_flag_is_given() -> None:
    run = resolve(None, {"init": "ckpt.safetensors", "lr": 3e-4}, resume=False, has_state=False)
    assert run.config.lr == 3e-4  # a flag given wins
    assert {k: getattr(run.config, k) for k in FINETUNE_DEFAULTS if k != "lr"} == {k: v for k, v in FINETUNE_DEFAULTS.items() if k != "lr"}
    assert run.finetune == {k: v for k, v in FINETUNE_DEFAULTS.items() if k != "lr"}
    # --resume of a folder with no state starts afresh: the recipe applies then too.
    assert resolve(None, {"init": "ckpt.safetensors"}, resume=True, has_state=False).finetune == FINETUNE_DEFAULTS


def test_a_resumed_run_keeps_its_saved_values_and_takes_runtime_flags() -> None:
    given = {"out": "runs/b", "threads": 2, "total_steps": 30000, "synth": ["./data/synth"], "point_loss": 1.0}
    run = resolve(SAVED, given, resume=True, has_state=True)
    assert run.resumes and not run.finetune and not run.rewrite_saved  # no fine-tune recipe when resuming
    expected = replace(SAVED_RUN, threads=2, total_steps=30000, max_minutes=None, stop_at_step=None)
    assert run.config == expected  # the time budget and stop step were for their invocation only
    assert run.config.synth == ["data/synth"]  # the same folder spelt otherwise: the saved spelling
    assert resolve(SAVED, {"out": "runs/b"}, resume=True, has_state=True).config.total_steps == 24000  # bare --resume: the saved schedule


def test_a_flag_contradicting_the_saved_run_is_refused_in_one_line_unless_overridden() -> None:
    given = {"out": "runs/b", "lr": 1e-3, "loss": "ce", "gamma": 0.0, "total_steps": 2}
    with pytest.raises(ResumeRefused) as refused:
        resolve(SAVED, given, resume=True, has_state=True)
    message = str(refused.value)
    assert "\n" not in message and "--override-saved" in message
    assert "--lr 0.001 (saved: 0.00015)" in message and "--loss ce (saved: focal)" in message and "--gamma 0.0 (saved: 2.0)" in message
    assert "--total-steps" not in message  # a runtime field may change
    run = resolve(SAVED, given, resume=True, has_state=True, override_saved=True)
    assert (run.config.lr, run.config.loss, run.config.gamma, run.config.total_steps) == (1e-3, "ce", 0.0, 2)
    assert run.config.point_loss == 1.0 and run.rewrite_saved
    # Without a saved state nothing is resumed, so nothing contradicts it.
    assert resolve(SAVED, given, resume=True, has_state=False).config.loss == "ce"


def test_a_resume_needs_the_world_size_it_was_trained_with() -> None:
    with pytest.raises(ResumeRefused, match="resumes exactly only with torchrun --nproc_per_node 2"):
        resolve({**SAVED, "world_size": 2}, {"out": "runs/b"}, resume=True, has_state=True)
    with pytest.raises(ResumeRefused, match=r"trained by 1 process\(es\) and this launch has 3; .* one process \(no torchrun\)"):
        resolve({k: v for k, v in SAVED.items() if k != "world_size"}, {"out": "runs/b"}, resume=True, has_state=True, world_size=3)
    assert resolve({**SAVED, "world_size": 2}, {"out": "runs/b"}, resume=True, has_state=True, world_size=2).resumes


def test_what_cannot_be_resumed_or_built_is_refused() -> None:
    with pytest.raises(ResumeRefused, match="holds a state.pt but no config.json"):
        resolve(None, {"out": "runs/b"}, resume=True, has_state=True)
    with pytest.raises(ValueError, match="--loss must be focal or ce"):
        resolve(None, {"loss": "mse"}, resume=False, has_state=False)
    with pytest.raises(ValueError, match=r"--stream-mix 'long=0.1': expected KIND=WEIGHT with KIND one of word_by_frequency"):
        TrainConfig(stream_mix=["long=0.1"], stream_workers=1)
    with pytest.raises(ValueError, match="--stream-mix changes the streamed crops: give --stream-workers"):
        TrainConfig(stream_mix=["long_token=0.1"])
    with pytest.raises(ValueError, match="--rectifier-only trains on the point loss alone"):
        resolve(None, {"rectifier_only": True}, resume=False, has_state=False)


def test_the_saved_config_round_trips(tmp_path: Path) -> None:
    assert read_saved(tmp_path) is None
    write_saved(tmp_path, SAVED_RUN, 2)
    assert read_saved(tmp_path) == {**asdict(SAVED_RUN), "world_size": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary file left
