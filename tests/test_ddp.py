"""``safl train`` under torchrun (DistributedDataParallel, gloo on the CPU): two processes
learn as one process does on the same global batch, a stopped run resumes exactly and
only with its own world size, and a killed rank ends the run with a clear error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import random_words, write_shards
from service_support import REPO, subprocess_env

from model import SAFL, SAFLConfig, load_checkpoint
from model.charset import PAD_ID
from model.training import distributed
from model.training.cli import main as cli_main
from model.training.data import ArrayDataset
from model.training.distributed import Ranks, derived_seed, stream_seed
from model.training.train import BatchSampler, TrainConfig, Trainer

N_STEPS = 8
TRAIN_FLAGS = {
    "preset": "tiny",
    "total_steps": N_STEPS,
    "batch_size": 16,
    "lr": 2e-3,
    "warmup_steps": 3,
    "threads": 1,
    "val_every": 0,
    "log_every": 1,
    "checkpoint_minutes": 1e9,
    "amp": "off",
    "ddp_timeout": 60.0,
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shards(tmp_path_factory.mktemp("synth"), random_words(48, seed=0))


def _flags(out: Path, shards: Path, **overrides: object) -> list[str]:
    values = {**TRAIN_FLAGS, "out": out, "synth": shards, **overrides}
    return ["train", "--no-progress"] + [a for k, v in values.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def _torchrun(args: list[str], nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "model.training.cli", *args]


def _run(args: list[str], nproc: int = 2, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_torchrun(args, nproc), cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


@contextmanager
def _training(out: Path, log: Path, shards: Path, ddp_timeout: float) -> Iterator[tuple[subprocess.Popen, Any]]:
    """A long 2-process run in the background, once both ranks train (two steps logged):
    torchrun's process and rank 1's ``psutil.Process``. Whatever is left is killed after."""
    psutil = pytest.importorskip("psutil")
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            _torchrun(_flags(out, shards, total_steps=100000, ddp_timeout=ddp_timeout)),
            cwd=REPO,
            env=subprocess_env(),
            stdout=fh,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        deadline = time.monotonic() + 90
        while not ((out / "log.jsonl").is_file() and (out / "log.jsonl").read_text().count("\n") >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        (rank1,) = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
        yield proc, rank1
    finally:
        if proc.poll() is None:
            for p in psutil.Process(proc.pid).children(recursive=True):
                p.kill()
            proc.kill()
            proc.wait()


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r}


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / "last.safetensors")[0].state_dict()


def test_two_processes_learn_as_one_does(tmp_path: Path, shards: Path) -> None:
    # Without augmentation, which each process draws for its own share: the very same data.
    out = tmp_path / "two"
    done = _run(_flags(out, shards, augment=0))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("ddp world_size=2: --batch-size 16 is the global batch, 8 crops per process")
    assert sum(line.startswith("training tiny") for line in lines) == 1  # rank 0 alone speaks
    assert json.loads(lines[-1])["step"] == N_STEPS
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert load_checkpoint(out / "last.safetensors")[1].training["world_size"] == 2

    one = tmp_path / "one"
    Trainer(TrainConfig(out=str(one), synth=[str(shards)], progress=False, **{**TRAIN_FLAGS, "augment": 0.0})).run()
    ddp, single = _losses(out), _losses(one)
    assert list(ddp) == list(single) == list(range(1, N_STEPS + 1))  # one log line a step: rank 0 alone writes
    # The same global batches and the same token-mean gradient; BatchNorm normalises over
    # each process's half, the one difference: 0.1 % here (without it the curves are equal).
    np.testing.assert_allclose(list(ddp.values()), list(single.values()), rtol=0.01)
    assert ddp[N_STEPS] < 0.8 * ddp[1]


def test_a_stopped_run_resumes_exactly_and_only_with_its_world_size(tmp_path: Path, shards: Path) -> None:
    # Augmentation and degradations on: each process's own draws continue exactly too.
    straight, out = tmp_path / "straight", tmp_path / "split"
    done = _run(_flags(straight, shards, degrade=0.5))
    assert done.returncode == 0, done.stdout + done.stderr
    first = _run(_flags(out, shards, degrade=0.5, stop_at_step=N_STEPS // 2))
    assert first.returncode == 0, first.stdout + first.stderr
    assert json.loads(first.stdout.splitlines()[-1])["step"] == N_STEPS // 2

    # Another world size is refused with one line, by rank 0 alone, before any training.
    refused = _run([*_flags(out, shards), "--resume"], nproc=3)
    assert refused.returncode != 0
    said = [line for line in (refused.stdout + refused.stderr).splitlines() if line.startswith("safl train:")]
    assert len(said) == 1 and "trained by 2 process(es) and this launch has 3" in said[0], refused.stdout + refused.stderr
    with pytest.raises(SystemExit, match="resumes exactly only with torchrun --nproc_per_node 2"):
        cli_main([*_flags(out, shards), "--resume"])  # one process

    resumed = _run([*_flags(out, shards), "--resume"])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed at step 4" in resumed.stdout
    assert _losses(out) == _losses(straight)
    a, b = _weights(straight), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_killed_rank_ends_the_run_with_a_clear_error(tmp_path: Path, shards: Path) -> None:
    log = tmp_path / "output.txt"
    with _training(tmp_path / "killed", log, shards, ddp_timeout=20) as (proc, rank1):
        killed_at = time.monotonic()
        os.kill(rank1.pid, signal.SIGKILL)
        rc = proc.wait(timeout=60)  # a hang fails here
    text = log.read_text()
    assert rc != 0 and time.monotonic() - killed_at < 60, text
    assert "safl train: ddp rank 0 of 2: lost contact with the other ranks at step" in text, text
    assert "--ddp-timeout 20 s" in text


@pytest.mark.slow
def test_a_stalled_rank_ends_the_run_after_the_timeout(tmp_path: Path, shards: Path) -> None:
    log = tmp_path / "output.txt"
    with _training(tmp_path / "stalled", log, shards, ddp_timeout=10) as (proc, rank1):
        rank1.suspend()  # alive, but never answers: only the timeout can tell
        stalled_at = time.monotonic()
        while "lost contact" not in log.read_text():
            assert time.monotonic() - stalled_at < 10 + 30, log.read_text()
            time.sleep(0.2)
        assert time.monotonic() - stalled_at >= 9
        rank1.kill()  # torchrun would, 30 s after rank 0 failed
        assert proc.wait(timeout=60) != 0
    assert "ddp rank 0 of 2: lost contact with the other ranks at step" in log.read_text()


def test_each_rank_takes_its_share_of_the_global_batch() -> None:
    rng = np.random.default_rng(0)
    synth = ArrayDataset("synth", rng.integers(0, 255, (40, 32, 128), dtype=np.uint8), random_words(40, seed=1))
    real = ArrayDataset("real", rng.integers(0, 255, (10, 32, 128), dtype=np.uint8), random_words(10, seed=2))
    cfg = TrainConfig(batch_size=7, real_ratio=0.3, augment=0.0)  # 5 synthetic + 2 real: shares of 4 and 3
    charset = SAFL(SAFLConfig.from_preset("tiny")).charset

    def sampler(rank: int, world: int) -> BatchSampler:
        return BatchSampler(synth, real, cfg, charset, torch.Generator().manual_seed(0), rank=rank, world_size=world)

    def words(tokens: torch.Tensor) -> list[list[int]]:
        return [[t for t in row if t != PAD_ID] for row in tokens.tolist()]

    whole, shares = sampler(0, 1), [sampler(r, 2) for r in range(2)]
    for step in range(3):
        images, _, tgt, _ = whole.batch(step)
        for r, share in enumerate(shares):  # positions r, r + 2, ... of the whole batch
            s_images, _, s_tgt, _ = share.batch(step)
            assert torch.equal(s_images, images[r::2]) and words(s_tgt) == words(tgt[r::2])
    assert [s.n_synth_mine for s in shares] == [3, 2]
    with pytest.raises(ValueError, match="global batch"):
        BatchSampler(synth, real, TrainConfig(batch_size=2), charset, torch.Generator(), rank=0, world_size=3)


def test_the_token_weighted_losses_add_up_to_the_global_token_mean(monkeypatch: pytest.MonkeyPatch) -> None:
    # Rank 0 of 2 holds 4 target tokens, rank 1 holds 5 (all_reduce adds the other's count).
    targets = [torch.tensor([[4, 5, 2, PAD_ID], [6, PAD_ID, PAD_ID, PAD_ID]]), torch.tensor([[7, 8, 9, 10, 2]])]
    shares = []
    for rank, other in ((0, 5.0), (1, 4.0)):
        monkeypatch.setattr(distributed.dist, "all_reduce", lambda t, other=other: t.add_(other))
        shares.append(float(Ranks(rank=rank, world_size=2).token_share(targets[rank])))
    # DDP averages the ranks' gradients of share × token mean: (4 m0 + 5 m1) / 9, the global token mean.
    assert shares == pytest.approx([2 * 4 / 9, 2 * 5 / 9])
    # A loss over a subset of the tokens (distillation: crops without a space) weighs by that subset's
    # counts, 1 of 3 here, not by all tokens'; no rank having any gives 0, not a division by zero.
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda t: t.add_(2.0))
    assert float(Ranks(rank=0, world_size=2).share(torch.tensor([[True, False], [False, False]]))) == pytest.approx(2 * 1 / 3)
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda t: t.add_(0.0))
    assert float(Ranks(rank=0, world_size=2).share(torch.zeros(2, 3, dtype=torch.bool))) == 0.0


def test_seeds_of_each_rank() -> None:
    assert stream_seed(1, 0) == 1  # rank 0 renders a 1-process run's stream
    others = {stream_seed(1, r) for r in range(1, 8)}
    assert len(others) == 7 and min(others) >= 2**32 and stream_seed(2, 1) not in others
    assert derived_seed(0, "augment", 1, 5) == derived_seed(0, "augment", 1, 5) != derived_seed(0, "augment", 1, 6)
