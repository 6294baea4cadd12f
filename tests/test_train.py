"""The resumable trainer: a short run learns, and a stopped-and-resumed run is bit-identical."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_words, render_word, write_shards

from model import load_checkpoint
from model.checkpoint import read_info
from model.training.cli import main as cli_main
from model.training.data import ArrayDataset
from model.training.resume import read_saved, resolve
from model.training.train import BatchSampler, TrainConfig, Trainer, lr_factor

N_STEPS = 16


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small rendered shard folder (the ``safl synth`` layout), words drawn with Pillow's font."""
    words = random_words(48, seed=0)
    words[5] = "5€"  # not in the charset: filtered out at load time
    return write_shards(tmp_path_factory.mktemp("synth"), words)


@pytest.fixture(scope="module")
def real_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A labelled folder of real image files (PNG), used for the real share and validation."""
    folder = tmp_path_factory.mktemp("real")
    words = ["cab", "fig", "dog", "egg", "bead", "face", "jam", "kale", "lamp", "mop"]
    for i, w in enumerate(words):
        render_word(w, (100, 30)).save(folder / f"{i}.png")
    (folder / "labels.tsv").write_text("".join(f"{i}.png\t{w}\n" for i, w in enumerate(words)))
    return folder


def _cfg(out: Path, shards: Path, **overrides) -> TrainConfig:
    values = {
        "out": str(out),
        "preset": "tiny",
        "synth": [str(shards)],
        "total_steps": N_STEPS,
        "batch_size": 16,
        "lr": 2e-3,
        "warmup_steps": 4,
        "threads": 1,
        "progress": False,
        "val_every": 0,
        "log_every": 4,
        "checkpoint_minutes": 1e9,
        "amp": "off",
    }
    values.update(overrides)
    return TrainConfig(**values)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_lr_schedule() -> None:
    cfg = TrainConfig(lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, cfg) == pytest.approx(0.1)
    assert lr_factor(500, cfg) == pytest.approx(0.1)
    factors = [lr_factor(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(factors))


def test_short_run_lowers_the_loss(tmp_path: Path, shards: Path, real_folder: Path) -> None:
    out = tmp_path / "run"
    cfg = _cfg(out, shards, total_steps=24, real=[str(real_folder)], real_ratio=0.25, val=[str(real_folder)], val_every=12, keep_val_checkpoints=True)
    trainer = Trainer(cfg)
    assert trainer.n_train == (47, 7)  # 5€ dropped; the real folder's fine-tune part (70 %)
    assert [len(v) for v in trainer.val_sets] == [3]
    summary = trainer.run()
    assert summary["step"] == 24 and summary["stopped_by"] == "steps"
    log = _log(out)
    train_log = [r for r in log if "loss" in r]
    assert [r["step"] for r in train_log] == [4, 8, 12, 16, 20, 24]
    assert train_log[-1]["loss"] < 0.7 * train_log[0]["loss"]
    val_log = [r for r in log if "val" in r]
    assert [r["step"] for r in val_log] == [12, 24]
    assert 0.0 <= val_log[-1]["val"]["mean_acc36"] <= 1.0

    assert json.loads((out / "config.json").read_text())["preset"] == "tiny"
    # The latest weights are a servable checkpoint equal to the trainer's model.
    model, info = load_checkpoint(out / "last.safetensors")
    assert info.training["step"] == 24 and info.training["images_seen"] == 24 * 16
    assert info.training["loss"] == "focal" and info.training["gamma"] == 2.0
    sd = trainer.model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    _, best_info = load_checkpoint(out / "best.safetensors")
    assert "val" in best_info.training
    # --keep-val-checkpoints: the weights of each validation, with what they scored.
    assert sorted(p.name for p in out.glob("step-*.safetensors")) == ["step-000012.safetensors", "step-000024.safetensors"]
    kept, kept_info = load_checkpoint(out / "step-000024.safetensors")
    assert kept_info.training["step"] == 24 and kept_info.training["val"] == val_log[-1]["val"]
    assert all(torch.equal(v, sd[k]) for k, v in kept.state_dict().items())


def test_resume_continues_exactly(tmp_path: Path, shards: Path) -> None:
    straight = Trainer(_cfg(tmp_path / "straight", shards))
    straight.run()
    assert straight.step == N_STEPS

    first = Trainer(_cfg(tmp_path / "split", shards, stop_at_step=N_STEPS // 2))
    assert first.run()["step"] == N_STEPS // 2
    del first
    resumed = Trainer(_cfg(tmp_path / "split", shards), resume=True)
    assert resumed.resumed and resumed.step == N_STEPS // 2  # the step counter continues
    assert resumed.run()["step"] == N_STEPS

    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.sched.last_epoch == straight.sched.last_epoch == N_STEPS
    assert resumed.opt.param_groups[0]["lr"] == straight.opt.param_groups[0]["lr"]
    # Both logs end with the same losses: same batches, same augmentation, same schedule.
    ls, lr_ = _log(tmp_path / "straight"), _log(tmp_path / "split")
    assert [r["step"] for r in lr_] == [4, 8, 12, 16]
    assert [r["loss"] for r in ls] == [r["loss"] for r in lr_]
    state = torch.load(tmp_path / "split" / "state.pt", weights_only=True)
    assert state["step"] == N_STEPS


def test_a_best_score_measured_under_other_views_starts_again(tmp_path: Path, shards: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = Trainer(_cfg(tmp_path / "run", shards, stop_at_step=2))
    first.run()
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    state["best"] = 0.5
    torch.save(state, tmp_path / "run" / "state.pt")
    assert Trainer(_cfg(tmp_path / "run", shards), resume=True).best == 0.5  # the same views: kept
    del state["val_views"]  # a state saved when validation read the contrast views
    torch.save(state, tmp_path / "run" / "state.pt")
    capsys.readouterr()
    assert Trainer(_cfg(tmp_path / "run", shards), resume=True).best == -1.0
    assert "measured with other views" in capsys.readouterr().out


def test_checkpoints_record_the_data_and_a_resume_on_other_data_says_so(tmp_path: Path, shards: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rendered = tmp_path / "rendered"
    shutil.copytree(shards, rendered)
    (rendered / "meta.json").write_text(json.dumps({"renderer_version": 3, "seed": 9, "count": 48, "height": 32, "width": 128, "channels": 1}))
    first = Trainer(_cfg(tmp_path / "run", rendered, stop_at_step=2, real_ratio=0.0))
    first.run()
    data = read_info(tmp_path / "run" / "last.safetensors").training["data"]
    assert data == {"synthetic": [{"path": str(rendered), "renderer_version": 3, "seed": 9, "count": 48}], "real": [], "real_ratio": 0.0}
    capsys.readouterr()
    Trainer(_cfg(tmp_path / "run", rendered, real_ratio=0.0), resume=True)
    assert "continues on" not in capsys.readouterr().out  # the same data: nothing to say
    # The folder re-rendered by another renderer version: every crop differs from what the run began on.
    (rendered / "meta.json").write_text(json.dumps({"renderer_version": 2, "seed": 9, "count": 48, "height": 32, "width": 128, "channels": 1}))
    resumed = Trainer(_cfg(tmp_path / "run", rendered, real_ratio=0.0), resume=True)
    assert "--resume: the run started on" in capsys.readouterr().out
    assert resumed.training_meta()["data"]["synthetic"][0]["renderer_version"] == 2


def test_a_state_saved_before_the_fused_optimiser_resumes_on_it(tmp_path: Path, shards: Path) -> None:
    first = Trainer(_cfg(tmp_path / "run", shards, stop_at_step=2))
    first.run()
    assert all(g["fused"] for g in first.opt.param_groups)
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    for group in state["optimizer"]["param_groups"]:
        group["fused"] = None  # what runs saved before the fused kernel hold
    torch.save(state, tmp_path / "run" / "state.pt")
    resumed = Trainer(_cfg(tmp_path / "run", shards), resume=True)
    assert resumed.step == 2 and all(g["fused"] and g["foreach"] is None for g in resumed.opt.param_groups)
    assert resumed.run()["step"] == N_STEPS


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl_c"])
def test_a_signal_stops_after_the_step_and_the_run_resumes_exactly(tmp_path: Path, shards: Path, signum: int) -> None:
    straight = Trainer(_cfg(tmp_path / "straight", shards))
    straight.run()

    stopped = Trainer(_cfg(tmp_path / "stopped", shards))
    step = stopped.train_step

    def step_then_signal():  # as if `docker stop` (SIGTERM) or Ctrl-C came mid-step
        out = step()
        if stopped.step == 5:
            os.kill(os.getpid(), signum)
        return out

    stopped.train_step = step_then_signal
    handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    summary = stopped.run()
    assert summary["stopped_by"] == "interrupted" and summary["step"] == 5
    # The run's handlers are gone after it: the process's own are back.
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    resumed = Trainer(_cfg(tmp_path / "stopped", shards), resume=True)
    assert resumed.step == 5 and resumed.run()["step"] == N_STEPS
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_resume_keeps_the_saved_config(tmp_path: Path, shards: Path) -> None:
    Trainer(_cfg(tmp_path / "r", shards, stop_at_step=2)).run()
    # What is learnt cannot change on resume (lr, batch size); runtime fields can.
    given = {"out": str(tmp_path / "r"), "total_steps": 3, "log_every": 1}
    run = resolve(read_saved(tmp_path / "r"), given, resume=True, has_state=True)
    assert run.config.lr == 2e-3 and run.config.batch_size == 16
    assert run.config.total_steps == 3 and run.config.log_every == 1
    # The trainer takes that config as it is: the saved file is not read again.
    (tmp_path / "r" / "config.json").write_text("not the config")
    t = Trainer(run.config, resume=True)
    assert t.cfg == run.config and t.run()["step"] == 3


def test_resume_without_state_starts_afresh(tmp_path: Path, shards: Path) -> None:
    t = Trainer(_cfg(tmp_path / "new", shards, total_steps=2), resume=True)
    assert not t.resumed and t.step == 0
    assert t.run()["step"] == 2


def test_fine_tune_from_a_checkpoint(tmp_path: Path, shards: Path, tiny_checkpoint: Path, tiny_model) -> None:
    t = Trainer(_cfg(tmp_path / "ft", shards, init=str(tiny_checkpoint), preset="small", total_steps=1))
    assert t.model_cfg == tiny_model.config  # the checkpoint's config, not the preset
    sd = tiny_model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in t.model.state_dict().items())
    t.run()
    assert not torch.equal(t.model.state_dict()["decoder.head.weight"], sd["decoder.head.weight"])


def test_batch_sampler_mixes_real_and_synthetic() -> None:
    from model import Charset

    synth = ArrayDataset("s", np.zeros((10, 32, 128), np.uint8), ["aa"] * 10)
    real = ArrayDataset("r", np.full((5, 32, 128), 255, np.uint8), ["bb"] * 5)
    cfg = TrainConfig(batch_size=8, real_ratio=0.25, augment=0.0)
    images, inp, tgt, points = BatchSampler(synth, real, cfg, Charset(), torch.Generator().manual_seed(0)).next()
    assert images.shape == (8, 1, 32, 128) and inp.shape == tgt.shape == (8, 3)
    assert points is None  # neither source carries fiducial points
    assert (images[:6] == -1).all() and (images[6:] == 1).all()  # 6 synthetic, then 2 real
    only_real = BatchSampler(synth.subset([]), real, cfg, Charset(), torch.Generator())
    assert only_real.n_real == 8
    with pytest.raises(ValueError, match="no training data"):
        BatchSampler(synth.subset([]), None, cfg, Charset(), torch.Generator())


def test_cli_train(tmp_path: Path, shards: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    args = ["train", "--out", str(out), "--preset", "tiny", "--synth", str(shards), "--total-steps", "2", "--batch-size", "4"]
    args += ["--threads", "1", "--no-progress", "--val-every", "0", "--amp", "off", "--warmup-steps", "1", "--log-every", "1"]
    assert cli_main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 2
    saved = json.loads((out / "config.json").read_text())
    assert saved["batch_size"] == 4 and saved["preset"] == "tiny" and saved["synth"] == [str(shards)]
    assert cli_main([a if a != "2" else "3" for a in args] + ["--resume"]) == 0  # --total-steps 3
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 3
    with pytest.raises(SystemExit):
        cli_main(["train", "--out", str(tmp_path / "x"), "--loss", "mse"])


def test_a_repeated_list_flag_adds_to_the_list() -> None:
    from service.cli import build_parser

    args = build_parser().parse_args(["train", "--stream-mix", "long_token=0.15", "--stream-mix", "phrase=0.1", "--real", "a", "b", "--real", "c"])
    assert args.stream_mix == ["long_token=0.15", "phrase=0.1"] and args.real == ["a", "b", "c"]
    assert not hasattr(build_parser().parse_args(["train"]), "real")  # not given: the saved run's value on --resume


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "no training data"),
        (["--init", "missing.safetensors"], "checkpoint weights not found"),
        (["--real", "no-such-folder", "--real-ratio", "0.5"], "no-such-folder"),
        pytest.param(["--device", "cuda"], "no CUDA GPU", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")),
    ],
    ids=["no_data", "missing_init", "missing_real", "no_gpu"],
)
def test_cli_train_setup_errors_are_one_line(tmp_path: Path, extra: list[str], message: str) -> None:
    """A run that cannot start exits with one line naming the problem, not a traceback."""
    with pytest.raises(SystemExit) as exc:
        cli_main(["train", "--out", str(tmp_path / "run"), "--preset", "tiny", "--no-progress", *extra])
    assert isinstance(exc.value.code, str) and exc.value.code.startswith("safl train: ") and message in exc.value.code


def test_reset_tps_keeps_the_rest_and_makes_the_rectifier_the_identity() -> None:
    from dataclasses import replace

    from model import SAFL, SAFLConfig
    from model.training.train import with_identity_tps

    torch.manual_seed(0)
    old = SAFL(replace(SAFLConfig.from_preset("tiny"), tps_max_offset=0.0, tps_monotone=False))
    with torch.no_grad():
        old.rectifier.fc.weight.normal_(0, 1.0)  # a drifted, unbounded TPS head
    fresh = with_identity_tps(old)
    assert fresh.config.tps_max_offset > 0 and fresh.config.tps_monotone
    x = torch.randn(2, 1, 32, 128)
    torch.testing.assert_close(fresh.rectifier(x), x, atol=1e-3, rtol=0)
    torch.testing.assert_close(fresh.decoder.head.weight, old.decoder.head.weight)


def _tiny_cli(out: Path, shards: Path) -> list[str]:
    """``safl train`` arguments for a quick tiny run on ``shards``."""
    return [
        "train",
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--synth",
        str(shards),
        "--batch-size",
        "4",
        "--threads",
        "1",
        "--no-progress",
        "--val-every",
        "0",
        "--amp",
        "off",
        "--warmup-steps",
        "1",
    ]


def test_resume_refuses_a_flag_that_contradicts_the_saved_run(tmp_path: Path, shards: Path) -> None:
    out = tmp_path / "focal"
    base = _tiny_cli(out, shards)
    assert cli_main([*base, "--total-steps", "1"]) == 0
    with pytest.raises(SystemExit) as exc:
        cli_main([*base, "--total-steps", "2", "--resume", "--loss", "ce", "--gamma", "0"])
    assert isinstance(exc.value.code, str)
    assert "--loss ce (saved: focal)" in exc.value.code and "--gamma 0.0 (saved: 2.0)" in exc.value.code
    assert "--total-steps" not in exc.value.code  # a runtime field may change
    # Flags equal to the saved run's are fine; --override-saved makes the given ones win.
    assert cli_main([*base, "--total-steps", "2", "--resume", "--loss", "focal"]) == 0
    assert cli_main([*base, "--total-steps", "3", "--resume", "--loss", "ce", "--override-saved"]) == 0
    assert json.loads((out / "config.json").read_text())["loss"] == "ce"
    assert load_checkpoint(out / "last.safetensors")[1].training["loss"] == "ce"


def test_a_short_run_with_val_ends_with_a_validation(tmp_path: Path, shards: Path, real_folder: Path, capsys) -> None:
    # Validation every 1,000 steps never came in a 3-step run, which then left no best.safetensors.
    out = tmp_path / "short"
    summary = Trainer(_cfg(out, shards, total_steps=3, warmup_steps=10, val=[str(real_folder)], val_every=1000, log_every=50)).run()
    assert [r["step"] for r in _log(out) if "val" in r] == [3]
    assert (out / "best.safetensors").is_file()
    printed = capsys.readouterr().out
    # Three steps, none of them logged (--log-every 50): trained all the same, and its speed measured.
    assert summary["img_s"] > 0 and "short: stopped at step 3 (steps)" in printed and "nothing to train" not in printed
    assert "warning: --warmup-steps 10 is not below --total-steps 3" in printed


def test_labels_left_out_of_training_are_reported(tmp_path: Path, shards: Path, capsys) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    words = [f"w{i}" for i in range(17)] + ["Café", "€5", "x" * 30]
    for i in range(len(words)):
        render_word("word", (90, 30)).save(folder / f"{i}.png")
    (folder / "labels.tsv").write_text("".join(f"{i}.png\t{w}\n" for i, w in enumerate(words)))
    Trainer(_cfg(tmp_path / "run", shards, total_steps=1, real=[str(folder)], real_ratio=0.5))
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("mixed-train:"))
    assert "labels left out of training" in line and "outside the charset" in line


def test_resume_without_flags_keeps_the_saved_schedule(tmp_path: Path, shards: Path) -> None:
    # A bare --resume once fell back to the default --total-steps (100000): the lr never decayed.
    out = tmp_path / "bare"
    base = [*_tiny_cli(out, shards), "--total-steps", "3"]
    assert cli_main([*base, "--stop-at-step", "1"]) == 0
    assert cli_main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0  # the stop step was for one invocation
    assert load_checkpoint(out / "last.safetensors")[1].training["step"] == 3


def test_resuming_a_finished_run_says_so(tmp_path: Path, shards: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "done"
    assert cli_main([*_tiny_cli(out, shards), "--total-steps", "2"]) == 0
    capsys.readouterr()
    assert cli_main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "already at step 2 of 2: nothing to train" in said and "None img/s" not in said


def test_a_short_fine_tune_does_not_end_below_its_start(tmp_path: Path, shards: Path, memorised_checkpoint, capsys) -> None:
    # A model that reads its words, fine-tuned on a folder of them mixed with synthetic data
    # under the fine-tune recipe: validated at step 0, so the run's result (best.safetensors)
    # never ends below that start, and a last step below it is reported. (This toy model,
    # memorised on 6 exact images, does forget: its validation words are not in the
    # fine-tune part, and it drops to 0.8 within 20 steps.)
    ckpt, words = memorised_checkpoint
    folder = tmp_path / "mine"
    folder.mkdir()
    labels = [w for w in words for _ in range(3)]
    for i, w in enumerate(labels):
        render_word(w).save(folder / f"{i}.png")
    (folder / "labels.tsv").write_text("".join(f"{i}.png\t{w}\n" for i, w in enumerate(labels)))
    out = tmp_path / "ft"
    args = [
        "train",
        "--out",
        str(out),
        "--init",
        str(ckpt),
        "--synth",
        str(shards),
        "--real",
        str(folder),
        "--real-ratio",
        "0.5",
        "--val",
        str(folder),
        "--total-steps",
        "60",
        "--warmup-steps",
        "5",
        "--val-every",
        "20",
        "--batch-size",
        "8",
        "--threads",
        "1",
        "--no-progress",
    ]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "fine-tuning from --init: --lr 0.0001, --min-lr-ratio 0.1, --tps-lr-scale 0" in printed  # flags given are not listed
    vals = [r for r in _log(out) if "val" in r]
    assert vals[0]["step"] == 0 and [r["step"] for r in vals[1:]] == [20, 40, 60]
    start = vals[0]["val"]["mean_acc36"]
    assert start > 0.5  # the memorised model reads its words
    best = json.loads((out / "best.json").read_text())["training"]["val"]["mean_acc36"]
    assert best == max(r["val"]["mean_acc36"] for r in vals) >= start
    last = vals[-1]["val"]["mean_acc36"]
    assert ("note: the last validation" in printed) == (last < start), printed
    assert json.loads((out / "config.json").read_text())["tps_lr_scale"] == 0.0


def test_a_new_charset_keeps_what_the_shared_characters_read(memorised_checkpoint, tmp_path: Path) -> None:
    from model.training.train import read_charset, with_charset

    ckpt, words = memorised_checkpoint
    model, _ = load_checkpoint(ckpt)
    images = torch.cat([m.unsqueeze(0) for m in _memorised_images(model, words)])
    before = model.recognize(images)
    # Added characters (accented letters, a space) and the old ones reordered: the same
    # readings with the same confidences.
    grown = with_charset(model, "äöü " + model.charset.chars[::-1])
    assert grown.decoder.head.out_features == model.decoder.head.out_features + 4
    after = grown.recognize(images)
    assert [r.text for r in after] == [r.text for r in before] == list(words)
    assert [r.confidence for r in after] == pytest.approx([r.confidence for r in before], rel=1e-3)
    # Only the characters the words use: the same readings, the dropped characters' share of
    # probability now going to the rest.
    used = "".join(sorted(set("".join(words))))
    shrunk = with_charset(model, used).recognize(images)
    assert [r.text for r in shrunk] == list(words)
    assert all(s.confidence >= b.confidence - 1e-6 for s, b in zip(shrunk, before, strict=True))
    (tmp_path / "chars.txt").write_text("ab c\n", encoding="utf-8")
    assert read_charset(str(tmp_path / "chars.txt")) == "ab c" and read_charset("xyz") == "xyz"
    with pytest.raises(Exception, match="duplicate"):
        read_charset("aa")


def _memorised_images(model, words: list[str]) -> list[torch.Tensor]:
    from model.preprocess import preprocess

    return [preprocess(render_word(w), model.config.preprocess) for w in words]


def test_cli_trains_a_model_over_its_own_charset(tmp_path: Path, shards: Path) -> None:
    out = tmp_path / "digits"
    args = [*_tiny_cli(out, shards), "--charset", "0123456789abcdefghijklmnopqrstuvwxyz ", "--total-steps", "1"]
    assert cli_main(args) == 0
    _, info = load_checkpoint(out / "last.safetensors")
    assert info.config.charset == "0123456789abcdefghijklmnopqrstuvwxyz "


def test_freeze_holds_the_named_parts_and_their_statistics_while_the_rest_learns(tmp_path: Path, shards: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The tiny preset's rectifier and encoder hold BatchNorm layers: in train mode their
    # running statistics would move even with no gradient.
    trainer = Trainer(_cfg(tmp_path / "run", shards, freeze=["rectifier", "encoder"], total_steps=3, tps_lr_scale=1.0))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()
    after = trainer.model.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"decoder"}, changed
    assert any("running_mean" in k for k in before if k.startswith(("rectifier.", "encoder.")))  # there were statistics to hold
    assert read_saved(tmp_path / "run")["freeze"] == ["rectifier", "encoder"]  # run-defining: --resume keeps it
    assert re.search(r"\(0\.\d\d M params, 0\.\d\d M of them trained\)", capsys.readouterr().out)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"freeze": ["stem"]}, "--freeze takes rectifier, encoder, decoder, got stem"),
        ({"freeze": ["rectifier", "encoder", "decoder"]}, "leaves nothing to train"),
        ({"freeze": ["encoder"], "rectifier_only": True, "point_loss": 1.0, "tps_lr_scale": 1.0}, "drop --freeze"),
        ({"freeze": ["rectifier"], "point_loss": 1.0}, "--freeze rectifier with --point-loss"),
    ],
)
def test_freeze_refuses_what_cannot_train(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(**overrides)


def test_hold_bn_stats_keeps_the_running_statistics_while_the_weights_train(tmp_path: Path, shards: Path) -> None:
    runs = {}
    for hold in (False, True):
        trainer = Trainer(_cfg(tmp_path / f"run-{hold}", shards, hold_bn_stats=hold, total_steps=3, tps_lr_scale=1.0))
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.run()
        after = trainer.model.state_dict()
        runs[hold] = {k for k in before if not torch.equal(before[k], after[k])}
    stats = {k for k in runs[False] if "running_" in k}
    assert stats  # without it, BatchNorm statistics move with the batches
    assert not {k for k in runs[True] if "running_" in k or "num_batches" in k}
    assert {"encoder.stem.net.1.weight", "encoder.stem.net.1.bias"} <= runs[True]  # a BatchNorm layer's own weights still train
    assert read_saved(tmp_path / "run-True")["hold_bn_stats"] is True  # run-defining: --resume keeps it
