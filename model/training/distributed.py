"""Data-parallel training under ``torchrun`` (DistributedDataParallel).

``torchrun --standalone --nproc_per_node N --no-python safl train ...`` starts N copies of
``safl train``; each finds its place in the job in the variables torchrun sets (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``). Without them ``Ranks()`` is the single process of a plain
run and every method here is a no-op.

How a run is shared out (``BatchSampler`` and ``Trainer`` in ``train.py``):

- ``--batch-size`` is the global batch. Which crops form it is drawn from one generator
  that every rank holds in the same state, so each rank knows the whole batch and keeps
  position ``p`` when ``p % world_size == rank``: every rank reads and augments only its
  own share, with the same synthetic / real mix as the others.
- Each rank's loss is its token mean weighted by its share of the batch's tokens, so the
  gradient DDP averages is the global batch's token mean, as one process computes it.
- Augmentation draws come from a generator per rank, re-seeded from (seed, rank, step)
  at every step; a render stream (``--stream-workers``) renders per rank with its own
  seed. Neither needs saving for ``--resume``, but both depend on the world size: a run
  resumes exactly only with the world size it was started with.
- Rank 0 alone validates, logs, prints and writes checkpoints and the state; the others
  wait for it in the next collective. Every step ends with a tiny all-reduce that makes
  all ranks stop (time budget, Ctrl-C / SIGTERM) at the same step.
- BatchNorm normalises over each rank's share (PyTorch's SyncBatchNorm is GPU-only and
  costs a collective per layer), which is the one difference from a 1-process run.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from ..charset import PAD_ID

#: What torchrun sets in each process it starts.
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistributedError(RuntimeError):
    """A collective failed: another rank died, was killed or stalled past ``--ddp-timeout``."""


def derived_seed(seed: int, *keys: int | str) -> int:
    """A seed for the stream named by ``keys`` (e.g. ``"augment", rank, step``), the same on
    every machine; above 2**32, so it never equals a seed anyone types."""
    words = [seed % 2**64] + [k if isinstance(k, int) else int.from_bytes(k.encode(), "little") for k in keys]
    return 2**32 + int(np.random.SeedSequence(words).generate_state(1)[0])


def stream_seed(seed: int, rank: int) -> int:
    """The renderer seed of a rank's stream: ``--stream-seed`` itself on rank 0 (a 1-process
    run's stream), a seed of its own on every other rank."""
    return seed if rank == 0 else derived_seed(seed, "stream", rank)


@dataclass
class Ranks:
    """This process's place in a data-parallel job (``rank`` of ``world_size``) and the
    collectives the trainer needs; a single process (the default) has nothing to share."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout: float = 600.0  # seconds a collective waits for the other ranks
    launched: bool = False  # started by torchrun (with any number of processes)
    backend: str | None = None  # set by start()
    _device: torch.device = field(default_factory=lambda: torch.device("cpu"), repr=False)

    @classmethod
    def from_env(cls) -> Ranks:
        """The job torchrun describes in the environment; a single process without it."""
        if not all(v in os.environ for v in TORCHRUN_VARS):
            return cls()
        return cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]), launched=True)

    @property
    def enabled(self) -> bool:
        """Whether there are other ranks to share the work with."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that validates, logs, prints and writes files."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """This rank's GPU when training on CUDA (``cuda:LOCAL_RANK``), else ``device``."""
        return torch.device("cuda", self.local_rank) if self.enabled and device.type == "cuda" else device

    def start(self, device: torch.device, timeout: float) -> None:
        """Join the process group: NCCL on CUDA, gloo on the CPU. A collective (and this
        join) that waits longer than ``timeout`` seconds for another rank raises."""
        if not self.enabled:
            return
        self.timeout, self._device = timeout, device
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        with self.failures("the start (joining the process group)"):
            dist.init_process_group(
                self.backend,
                rank=self.rank,
                world_size=self.world_size,
                timeout=timedelta(seconds=timeout),
                device_id=device if device.type == "cuda" else None,
            )

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` under DistributedDataParallel (its gradients averaged over the ranks)."""
        if not self.enabled:
            return model
        ids = [self._device.index] if self._device.type == "cuda" else None
        with self.failures("the start (sharing the initial weights)"):
            return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def token_share(self, targets: torch.Tensor) -> torch.Tensor:
        """``world_size`` × this rank's share of the global batch's target tokens: the factor
        that turns a rank's token-mean loss into its part of the global token mean, once DDP
        averages the gradients."""
        return self.share(targets != PAD_ID)

    def share(self, mask: torch.Tensor) -> torch.Tensor:
        """``world_size`` × this rank's share of the positions set in ``mask`` (bool, any shape)
        over all ranks: ``token_share`` for a loss averaged over a subset of the tokens (0 when
        no rank has any; 1 in a single process)."""
        if not self.enabled:
            return torch.ones((), device=mask.device)
        mine = mask.sum().to(torch.float32)
        total = mine.clone()
        dist.all_reduce(total)
        return mine * self.world_size / total.clamp(min=1)

    def sum(self, values: list[float]) -> list[float]:
        """``values`` summed over the ranks (element-wise); as given in a single process."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, *flags: bool) -> list[bool]:
        """Each flag, true when it is true on any rank: decisions all ranks must share."""
        return [v > 0 for v in self.sum([float(f) for f in flags])]

    def close(self) -> None:
        """Leave the process group after a run, all ranks together (a barrier)."""
        if self.enabled and dist.is_initialized():
            with self.failures("the final barrier"):
                dist.barrier()
            dist.destroy_process_group()

    def failures(self, where: str | Callable[[], str]) -> _Failures:
        """A context in which a failed collective becomes a ``DistributedError`` with a clear
        message, printed at once: torchrun's agent ends the surviving ranks soon after one dies."""
        return _Failures(self, where)


class _Failures:
    def __init__(self, ranks: Ranks, where: str | Callable[[], str]) -> None:
        self.ranks, self.where = ranks, where

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: object) -> bool:
        if not self.ranks.enabled or exc is None or not _is_collective_failure(exc):
            return False
        r = self.ranks
        # gloo's first sentence without its source location: "Read error [127.0.0.1]:28574: Connection reset by peer"
        first = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", str(exc).strip()).split(". ")[0].splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = self.where() if callable(self.where) else self.where
        message = (
            f"ddp rank {r.rank} of {r.world_size}: lost contact with the other ranks at {where} ({first[:200]}); "
            f"a rank died, was killed or stalled longer than --ddp-timeout {r.timeout:g} s. The run stops; --resume "
            "continues from the last saved state with the same number of processes"
        )
        print(f"safl train: {message}", file=sys.stderr, flush=True)
        raise DistributedError(message) from None


def _is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that could not complete (gloo and NCCL raise plain
    RuntimeErrors naming the peer, the connection or the timeout)."""
    if isinstance(exc, dist.DistError):
        return True
    if not isinstance(exc, RuntimeError) or isinstance(exc, DistributedError):  # not twice
        return False
    text = str(exc).lower()
    return any(word in text for word in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket"))
