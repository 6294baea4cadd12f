"""How ``safl train`` turns the flags given and a run folder's saved config into the config
it trains with: the one place a run is resumed, fine-tuned or refused (``resolve``).

A run folder keeps the config it was started with in ``config.json`` (``read_saved`` /
``write_saved``, with the number of processes that trained it). ``--resume`` continues the
run as saved: flags not given keep the saved values, runtime ones too (a resumed run once
fell back to the default ``--total-steps 100000`` and never decayed its lr), a time budget
or a stop step belongs to one invocation only, and a run-defining flag that contradicts the
saved run is refused unless ``--override-saved``. A run that starts afresh from ``--init``
takes the fine-tune recipe (``config.FINETUNE_DEFAULTS``) where its flags are not given.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .config import FINETUNE_DEFAULTS, RUNTIME_FIELDS, TrainConfig, with_finetune_defaults

#: The saved config's file in a run folder.
CONFIG_FILE = "config.json"
#: The resumable state's file in a run folder (written by the trainer).
STATE_FILE = "state.pt"


class ResumeRefused(ValueError):
    """A run that cannot be resumed as asked; the one-line message says what to do."""


@dataclass(frozen=True)
class RunConfig:
    """What ``resolve`` decided."""

    #: The config to train with.
    config: TrainConfig
    #: A saved state is continued (``--resume`` with a ``state.pt`` in the folder).
    resumes: bool
    #: The fine-tune recipe's values the run took (field → value): those not given, from ``--init``.
    finetune: dict[str, Any] = field(default_factory=dict)
    #: ``--override-saved`` changed run-defining values: the saved config is to be rewritten.
    rewrite_saved: bool = False


def resolve(saved: dict[str, Any] | None, given: dict[str, Any], resume: bool, has_state: bool, override_saved: bool = False, world_size: int = 1) -> RunConfig:
    """The config of a ``safl train`` invocation, from the folder's saved config (``saved``,
    ``read_saved``; ``None``: none), the flags typed (``given``: ``TrainConfig`` field →
    value, only those on the command line), ``--resume``, whether the folder holds a saved
    state, ``--override-saved`` and the number of processes launched. Pure: reads and
    writes nothing.

    Raises ``ValueError`` for a config ``TrainConfig`` refuses (its message names the flags),
    and ``ResumeRefused`` for flags that contradict the saved run without ``override_saved``,
    another ``world_size`` than the run's, or a state without a saved config.
    """
    resumes = resume and has_state
    base = TrainConfig()
    if resume and saved is not None:
        base = replace(TrainConfig.from_dict(saved), max_minutes=None, stop_at_step=None)
    cfg = replace(base, **given)
    if not resumes:
        # --resume with no saved state starts afresh (the README's commands end in --resume): the recipe applies then too.
        tuned = with_finetune_defaults(cfg, set(given))
        changed = {k: getattr(tuned, k) for k in FINETUNE_DEFAULTS if getattr(tuned, k) != getattr(cfg, k)}
        return RunConfig(tuned, resumes=False, finetune=changed)
    if saved is None:
        raise ResumeRefused(f"--resume: {cfg.out} holds a {STATE_FILE} but no {CONFIG_FILE}; start the run again without --resume")
    conflicts = resume_conflicts(TrainConfig.from_dict(saved), given)
    if conflicts and not override_saved:
        raise ResumeRefused(f"--resume keeps the saved run's settings, but {'; '.join(conflicts)}: drop the flag, or add --override-saved to change the run")
    saved_world = saved.get("world_size", 1)  # runs from before torchrun support had one process
    if saved_world != world_size:
        raise ResumeRefused(
            f"--resume: {cfg.out} was trained by {saved_world} process(es) and this launch has {world_size}; "
            f"each process's share of the batches depends on the number, so it resumes exactly only with "
            f"{'torchrun --nproc_per_node ' + str(saved_world) if saved_world > 1 else 'one process (no torchrun)'}"
        )
    run = TrainConfig.from_dict(saved | given) if conflicts else TrainConfig.from_dict(saved)
    return RunConfig(continued(run, cfg), resumes=True, rewrite_saved=bool(conflicts))


def continued(saved: TrainConfig, now: TrainConfig) -> TrainConfig:
    """The ``saved`` run as this invocation continues it: its run-defining values, with the
    runtime fields (``RUNTIME_FIELDS``) and the folder of ``now``."""
    return replace(saved, out=now.out, **{name: getattr(now, name) for name in RUNTIME_FIELDS})


def resume_conflicts(saved: TrainConfig, given: dict[str, Any]) -> list[str]:
    """The run-defining flags in ``given`` (name → value, as typed) that contradict ``saved``,
    as ``"--loss ce (saved: focal)"``; paths are compared resolved. A resumed run keeps its
    saved values, so such a flag would be ignored."""

    def same(a: Any, b: Any) -> bool:
        if a == b:
            return True
        paths = lambda v: [Path(x).resolve() for x in v] if isinstance(v, list) else [Path(v).resolve()]  # noqa: E731
        return isinstance(a, (str, list)) and isinstance(b, (str, list)) and type(a) is type(b) and paths(a) == paths(b)

    return [
        f"--{k.replace('_', '-')} {v} (saved: {getattr(saved, k)})"
        for k, v in given.items()
        if k not in RUNTIME_FIELDS and k != "out" and not same(v, getattr(saved, k))
    ]


def read_saved(out: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The saved config of the run folder ``out`` as written (``write_saved``: the
    ``TrainConfig`` fields and ``world_size``); ``None`` when there is none. Raises ``OSError``
    for a file that cannot be read and ``ValueError`` for one that is not JSON."""
    path = Path(out) / CONFIG_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_saved(out: str | os.PathLike[str], cfg: TrainConfig, world_size: int) -> None:
    """Write ``cfg`` and the number of processes training it as the saved config of ``out``,
    atomically through a file of this process's own (under torchrun every process may write
    it, the same text)."""
    path = Path(out) / CONFIG_FILE
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**asdict(cfg), "world_size": world_size}, indent=2) + "\n")
    os.replace(tmp, path)
