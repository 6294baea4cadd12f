"""The render stream and lockstep twin runs.

The stream must hand out crop ``p`` of the renderer's ``(seed, index)`` sequence at
position ``p`` whatever the workers and chunking, and continue there after a seek;
twins trained in lockstep must see the very same batches and resume exactly.

Discovering the system fonts and building a ``Renderer`` take seconds, so both are
module-scoped; forked stream workers inherit the parent's word list and textures.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import multiprocessing as mp
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_words, render_word, write_shards

from model.charset import DEFAULT_CHARS, NUM_SPECIAL
from model.preprocess import PreprocessConfig, resize, to_tensor
from model.training import stream as stream_module
from model.training import synth as synth_module
from model.training.cli import main as cli_main
from model.training.data import augment
from model.training.fonts import FontFace, discover_fonts
from model.training.stream import RenderStream
from model.training.synth import RENDERER_VERSION, Renderer, SynthConfig
from model.training.train import TrainConfig, Trainer, TrainingSetupError, train, train_lockstep
from model.training.words import SPACED_PHRASE_WEIGHT, TextMix

CFG = SynthConfig(seed=0)


@pytest.fixture(scope="module")
def faces() -> list[FontFace]:
    return discover_fonts(DEFAULT_CHARS)


@pytest.fixture(scope="module")
def renderer(faces: list[FontFace]) -> Renderer:
    """Crops in the reference order; also loads the word list workers then inherit."""
    return Renderer(CFG, faces)


@pytest.fixture
def known_fonts(monkeypatch: pytest.MonkeyPatch, faces: list[FontFace]) -> None:
    """Streams reuse the fonts found once instead of scanning the system again (seconds each)."""
    real = stream_module.discover_fonts
    # One scan serves the charset with the space and without it (``discover_fonts``).
    monkeypatch.setattr(stream_module, "discover_fonts", lambda charset: faces if charset in (DEFAULT_CHARS, DEFAULT_CHARS + " ") else real(charset))


def _reference(renderer: Renderer, indices: range) -> tuple[np.ndarray, list[str], np.ndarray]:
    rendered = [renderer.render_with_points(i) for i in indices]
    return np.stack([r[0] for r in rendered]), [r[1] for r in rendered], np.stack([r[2] for r in rendered]).astype(np.float16)


def _same_crops(got: tuple[np.ndarray, list[str], np.ndarray], want: tuple[np.ndarray, list[str], np.ndarray]) -> None:
    assert got[1] == want[1]
    assert got[0].dtype == np.uint8 and got[0].shape == want[0].shape
    assert np.array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[2], want[2])  # the fiducial points travel with their crops


# -- render stream --------------------------------------------------------------------------------


def test_stream_follows_the_renderer_order_across_takes_and_seeks(renderer: Renderer) -> None:
    # The stream discovers the fonts itself here: it must find what the reference renderer uses.
    before = set(mp.active_children())
    with RenderStream(CFG, workers=2, chunk=7) as stream:
        assert len(set(mp.active_children()) - before) == 2
        pos = 0
        for n in (5, 1, 13, 9):  # takes that straddle the 7-crop chunks
            images, labels, points = stream.take(n)
            assert images.shape == (n, CFG.height, CFG.width) and points.shape == (n, CFG.fiducial_points, 2)
            _same_crops((images, labels, points), _reference(renderer, range(pos, pos + n)))
            pos += n
            assert stream.position == pos
        stream.seek(3)  # back, into crops already handed out
        assert stream.position == 3
        _same_crops(stream.take(4), _reference(renderer, range(3, 7)))
        stream.seek(40)  # forward, past what was rendered ahead
        _same_crops(stream.take(6), _reference(renderer, range(40, 46)))
        assert stream.position == 46
    assert set(mp.active_children()) == before  # the workers are gone


def test_stream_seed_and_one_worker(renderer: Renderer, known_fonts: None) -> None:
    other = copy.copy(renderer)  # same fonts, textures and word list; only the seed differs
    other.cfg = dataclasses.replace(CFG, seed=1)
    with RenderStream(other.cfg, workers=1, chunk=3, depth=1) as stream:
        stream.seek(10)
        got = stream.take(8)
    _same_crops(got, _reference(other, range(10, 18)))
    seed0 = _reference(renderer, range(10, 18))
    assert sum(a != b for a, b in zip(got[1], seed0[1])) >= 6
    assert all(not np.array_equal(a, b) for a, b in zip(got[0], seed0[0]))


def test_a_stream_closes_when_a_worker_was_killed_from_outside(known_fonts: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # `pkill -f "safl train"` reaches the render workers too; one that died waiting for work held
    # the pool's task-queue lock, and Pool.terminate waited on it forever after the state was saved.
    monkeypatch.setattr(synth_module, "CLOSE_TIMEOUT_S", 2.0)
    stream = RenderStream(CFG, workers=1, chunk=4, depth=1)
    stream.take(4)
    time.sleep(3.0)  # the chunk in flight rendered, the worker waits for the next holding the lock
    (worker,) = mp.active_children()
    os.kill(worker.pid, signal.SIGKILL)
    time.sleep(1.0)  # the pool starts a new worker in its place
    closer = threading.Thread(target=stream.close, daemon=True)
    closer.start()
    closer.join(30)
    assert not closer.is_alive(), "closing the stream hung"
    assert not mp.active_children()


def test_stream_needs_a_worker() -> None:
    with pytest.raises(ValueError, match="at least one worker"):
        RenderStream(CFG, workers=0)


# -- augmentation ---------------------------------------------------------------------------------


def test_augment_is_a_function_of_the_generator_state() -> None:
    batch = to_tensor(np.stack([resize(render_word(w), PreprocessConfig()) for w in ("abc", "Hello", "42")]))
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    first = augment(batch.clone(), gen, 1.0)
    after = gen.get_state()
    gen.set_state(state)
    again = augment(batch.clone(), gen, 1.0)
    assert torch.equal(first, again) and torch.equal(gen.get_state(), after)
    assert first.shape == batch.shape and first.dtype == torch.float32
    assert first.min() >= -1.0 and first.max() <= 1.0
    assert not torch.equal(first, batch)
    assert not torch.equal(augment(batch.clone(), gen, 1.0), first)  # the generator moved on
    assert augment(batch, gen, 0.0) is batch


# -- lockstep twins -------------------------------------------------------------------------------

N_STEPS = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small shard folder (the ``safl synth`` layout), words drawn with Pillow's font."""
    return write_shards(tmp_path_factory.mktemp("synth"), random_words(32, seed=1))


def _cfg(out: Path, shards: Path | None, **overrides) -> TrainConfig:
    values = {
        "out": str(out),
        "preset": "tiny",
        "synth": [str(shards)] if shards else [],
        "total_steps": N_STEPS,
        "batch_size": 8,
        "lr": 2e-3,
        "warmup_steps": 2,
        "threads": 1,
        "progress": False,
        "val_every": 0,
        "log_every": 2,
        "checkpoint_minutes": 1e9,
        "amp": "off",
    }
    values.update(overrides)
    return TrainConfig(**values)


def _twins(root: Path, shards: Path, **overrides) -> tuple[TrainConfig, TrainConfig]:
    focal = _cfg(root / "focal", shards, **overrides)
    return focal, dataclasses.replace(focal, out=str(root / "ce"), loss="ce")


def _log(out: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


def test_lockstep_twins_share_every_batch(tmp_path: Path, shards: Path) -> None:
    focal_cfg, ce_cfg = _twins(tmp_path, shards)
    focal = Trainer(focal_cfg)
    ce = Trainer(ce_cfg, share_data_with=focal)
    sampler = focal.sampler
    assert ce.sampler is sampler and ce.gen is focal.gen and ce.n_train == focal.n_train == (32, 0)

    draws, handed = [], []
    draw, batch = sampler.next, sampler.batch
    sampler.next = lambda: draws.append(1) or draw()
    sampler.batch = lambda step: handed.append((step, batch(step))) or handed[-1][1]
    summaries = train_lockstep([focal, ce])

    assert [s["step"] for s in summaries] == [N_STEPS, N_STEPS] and focal.step == ce.step == N_STEPS
    assert len(draws) == N_STEPS  # one draw per step, handed to both
    assert [s for s, _ in handed] == [s for s in range(N_STEPS) for _ in (focal, ce)]
    for (_, a), (_, b) in zip(handed[::2], handed[1::2]):
        assert all(x is y for x, y in zip(a, b))
    for t in (focal, ce):
        assert (t.out / "state.pt").is_file() and (t.out / "last.safetensors").is_file()
        assert [r["step"] for r in _log(t.out)] == [2, 4, 6, 8]
    assert json.loads((ce.out / "config.json").read_text())["loss"] == "ce"
    # Both checkpoints name the data they shared.
    assert json.loads((ce.out / "last.json").read_text())["training"]["data"] == json.loads((focal.out / "last.json").read_text())["training"]["data"]
    assert [r["loss"] for r in _log(focal.out)] != [r["loss"] for r in _log(ce.out)]
    assert not torch.equal(focal.model.decoder.head.weight, ce.model.decoder.head.weight)

    # The twin leaves the first run untouched: it learns exactly what it would alone.
    alone = Trainer(_cfg(tmp_path / "alone", shards))
    alone.run()
    _assert_same_weights(alone.model.state_dict(), focal.model.state_dict())
    assert [r["loss"] for r in _log(alone.out)] == [r["loss"] for r in _log(focal.out)]


def test_lockstep_resume_continues_exactly(tmp_path: Path, shards: Path) -> None:
    straight = _twins(tmp_path / "straight", shards)
    focal = Trainer(straight[0])
    ce = Trainer(straight[1], share_data_with=focal)
    train_lockstep([focal, ce])

    k = 3
    split = _twins(tmp_path / "split", shards)
    first = train(dataclasses.replace(split[0], stop_at_step=k), twin=dataclasses.replace(split[1], stop_at_step=k))
    assert [r["step"] for r in first["runs"]] == [k, k]
    r_focal = Trainer(split[0], resume=True)
    r_ce = Trainer(split[1], resume=True, share_data_with=r_focal)
    assert r_focal.resumed and r_ce.resumed and r_focal.step == r_ce.step == k
    assert [s["step"] for s in train_lockstep([r_focal, r_ce])] == [N_STEPS, N_STEPS]

    for a, b in ((focal, r_focal), (ce, r_ce)):
        _assert_same_weights(a.model.state_dict(), b.model.state_dict())
        assert b.sched.last_epoch == a.sched.last_epoch == N_STEPS
        assert torch.load(b.out / "state.pt", weights_only=True)["step"] == N_STEPS
        # The split log has an extra record at the stop (step 3); the shared steps match.
        straight_log = {r["step"]: r["loss"] for r in _log(a.out)}
        split_log = {r["step"]: r["loss"] for r in _log(b.out)}
        assert sorted(split_log) == [2, 3, 4, 6, 8]
        assert all(split_log[s] == straight_log[s] for s in (2, 6, 8))


def test_lockstep_refuses_runs_at_different_steps(tmp_path: Path, shards: Path) -> None:
    focal_cfg, ce_cfg = _twins(tmp_path, shards)
    Trainer(dataclasses.replace(focal_cfg, stop_at_step=2)).run()
    with pytest.raises(ValueError, match="same step"):
        train(focal_cfg, resume=True, twin=ce_cfg)  # the focal run has a state, its twin does not
    ahead = Trainer(focal_cfg, resume=True)
    behind = Trainer(ce_cfg, share_data_with=ahead)
    assert (ahead.step, behind.step) == (2, 0)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        train_lockstep([ahead, behind])


def test_stream_training_resumes_at_the_stream_position(tmp_path: Path, renderer: Renderer, known_fonts: None) -> None:
    b = 4
    cfg = _cfg(tmp_path / "stream", None, stream_workers=1, batch_size=b, total_steps=3, log_every=1, augment=0.0)
    t = Trainer(cfg)
    assert t.run()["step"] == 3  # closes the stream
    assert isinstance(t.sampler.synth, RenderStream) and t.n_train == ("streamed", 0)
    assert t.sampler.synth.cfg.seed == cfg.stream_seed == 1
    assert t.sampler.synth.position == 3 * b
    assert [r["step"] for r in _log(cfg.out)] == [1, 2, 3]
    data = json.loads((Path(cfg.out) / "last.json").read_text())["training"]["data"]
    mix = dataclasses.asdict(TextMix.for_charset(t.charset.chars))
    assert data["synthetic"] == [{"stream": True, "renderer_version": RENDERER_VERSION, "seed": 1, "text_mix": mix}]
    # A twin that cannot join (no state: step 0) is refused, and the render workers stop.
    before = set(mp.active_children())
    with pytest.raises(ValueError, match="same step"):
        train(cfg, resume=True, twin=dataclasses.replace(cfg, out=str(tmp_path / "twin"), loss="ce"))
    assert set(mp.active_children()) == before

    resumed = Trainer(dataclasses.replace(cfg, total_steps=5), resume=True)
    stream = resumed.sampler.synth
    try:
        assert resumed.step == 3 and stream.position == 3 * b
        # The first batch after resuming is crops 12..15 of the stream's renderer sequence.
        reference = copy.copy(renderer)
        reference.cfg = stream.cfg
        images, labels, _ = _reference(reference, range(3 * b, 4 * b))
        got_images, _, got_tgt, _ = resumed.sampler.batch(3)
        assert torch.equal(got_images, to_tensor(images))
        assert torch.equal(got_tgt, resumed.charset.encode_batch(labels)[1])
    except BaseException:
        resumed.sampler.close()
        raise
    assert resumed.run()["step"] == 5
    assert stream.position == 5 * b


def test_a_model_reading_the_space_is_streamed_phrases_with_their_spaces(tmp_path: Path, known_fonts: None) -> None:
    cfg = _cfg(
        tmp_path / "spaced", None, stream_workers=1, batch_size=48, total_steps=1, augment=0.0, charset=DEFAULT_CHARS + " ", stream_mix=["long_token=0.15"]
    )
    t = Trainer(cfg)
    try:
        # The phrases a spaced charset adds, and --stream-mix's change of the rest (the lineage's data mix).
        assert t.sampler.synth.cfg.text_mix == TextMix(long_token=0.15, phrase=SPACED_PHRASE_WEIGHT)
        _, _, tgt, _ = t.sampler.batch(0)
    finally:
        t.sampler.close()
    labels = ["".join(t.charset.chars[i - NUM_SPECIAL] for i in row.tolist() if i >= NUM_SPECIAL) for row in tgt]  # untrimmed
    phrases = [s for s in labels if " " in s]
    assert phrases and all(s == s.strip() and "  " not in s for s in phrases), labels


def test_phrases_streamed_to_a_model_without_the_space_are_refused_before_any_worker_starts(tmp_path: Path) -> None:
    # In a render worker the refusal restarted the worker forever and the trainer waited on it.
    before = set(mp.active_children())
    with pytest.raises(TrainingSetupError, match="--stream-mix phrase: the phrase kind joins words with spaces"):
        Trainer(_cfg(tmp_path / "wordy", None, stream_workers=1, stream_mix=["phrase=0.1"]))
    assert set(mp.active_children()) == before


# -- CLI ------------------------------------------------------------------------------------------


def _train_args(out: Path, shards: Path) -> list[str]:
    args = ["train", "--out", str(out), "--preset", "tiny", "--synth", str(shards), "--total-steps", "2", "--batch-size", "4"]
    return args + ["--threads", "1", "--no-progress", "--val-every", "0", "--amp", "off", "--warmup-steps", "1", "--log-every", "1"]


def test_cli_twin(tmp_path: Path, shards: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "focal"
    same = tmp_path / "x" / ".." / "focal"  # another spelling of --out
    with pytest.raises(SystemExit, match="--twin-out must differ from --out"):
        cli_main([*_train_args(out, shards), "--twin-out", str(same)])
    assert not (out / "config.json").exists()

    twin = tmp_path / "ce"
    assert cli_main([*_train_args(out, shards), "--twin-out", str(twin), "--twin-loss", "ce", "--twin-gamma", "0.5"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(r["run"], r["step"]) for r in summary["runs"]] == [(str(out), 2), (str(twin), 2)]
    saved = json.loads((twin / "config.json").read_text())
    assert (saved["loss"], saved["gamma"], saved["out"]) == ("ce", 0.5, str(twin))
    assert json.loads((out / "config.json").read_text())["loss"] == "focal"
