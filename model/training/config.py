"""What defines a training run (``TrainConfig``) and which of it may change on resume, apart from
the trainer (``model.training.resume`` decides a resumed run's config): ``safl --help`` and ``safl serve`` import this, not the training stack."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from .split import DEFAULT_SPLIT, SplitConfig

__all__ = ["FINETUNE_DEFAULTS", "RUNTIME_FIELDS", "TrainConfig", "with_finetune_defaults"]


#: Fields that may change when a run is resumed (they do not change what is learnt).
RUNTIME_FIELDS = {
    "max_minutes",
    "threads",
    "checkpoint_minutes",
    "val_every",
    "keep_val_checkpoints",
    "log_every",
    "stop_at_step",
    "progress",
    "total_steps",
    "device",
    "amp",
    "ddp_timeout",
}


#: The parts of ``SAFL`` (its top-level modules) ``--freeze`` can hold still.
FREEZABLE = ("rectifier", "encoder", "decoder")


@dataclass
class TrainConfig:
    """Everything that defines a training run."""

    out: str = "runs/small-focal"
    preset: str = "small"
    init: str | None = None  # checkpoint to start from (fine-tuning), else random init
    reset_tps: bool = False  # with `init`: re-initialise the TPS head as the identity (bounded, monotone points)
    charset: str | None = None  # the characters to read (a string, or a file holding them); None: the preset's / --init's
    synth: list[str] = field(default_factory=list)  # shard folders / LMDBs / labels.tsv folders
    stream_workers: int = 0  # >0: render synthetic crops on the fly in this many processes instead of --synth
    stream_seed: int = 1  # renderer seed of the stream (seed 0 is the pre-rendered data/synth set)
    stream_mix: list[str] = field(default_factory=list)  # KIND=WEIGHT changes of the stream's text mix (safl synth --mix)
    real: list[str] = field(default_factory=list)  # labelled folders: their fine-tune part is trained on
    real_ratio: float = 0.0  # share of each batch drawn from `real`
    val: list[str] = field(default_factory=list)  # labelled folders: their validation part is reported
    val_fraction: float = DEFAULT_SPLIT.val_fraction  # the split of --real / --val folders (model.training.split)
    split_seed: int = DEFAULT_SPLIT.seed
    split_block: int = DEFAULT_SPLIT.block
    loss: str = "focal"
    gamma: float = 2.0
    batch_size: int = 64
    lr: float = 5e-4
    tps_lr_scale: float = 0.1  # the rectifier learns slower: a fast-moving grid destabilises everything after it
    point_loss: float = 0.0  # weight of the fiducial-point loss on crops with rendered geometry (model.loss.point_loss)
    rectifier_only: bool = False  # train the rectifier alone on the point loss: encoder and decoder frozen, no recognition loss
    rectifier_points_only: bool = False  # the point loss alone teaches the rectifier: the recognition loss's gradient stops at the warp
    freeze: list[str] = field(default_factory=list)  # parts of the network that do not train (FREEZABLE), e.g. a decoder taught alone
    hold_bn_stats: bool = False  # BatchNorm layers keep the start's running statistics (eval mode) while their weights train
    distill: str | None = None  # a teacher checkpoint whose readings the run is held to (model.loss.distill_loss), e.g. the model it starts from
    distill_weight: float = 1.0  # weight of the distillation term beside the recognition loss
    weight_decay: float = 0.05
    warmup_steps: int = 1000
    total_steps: int = 100000
    min_lr_ratio: float = 0.02
    clip: float = 1.0
    seed: int = 0
    augment: float = 1.0
    degrade: float = 0.0  # street-photo degradations (``data.degrade``); 0 leaves a run's draws as before
    threads: int = 2
    amp: str = "auto"  # auto | bf16 | off
    device: str = "auto"
    max_minutes: float | None = None
    checkpoint_minutes: float = 5.0
    val_every: int = 1000
    keep_val_checkpoints: bool = False  # keep the weights of every validation (step-NNNNNN.safetensors): a run's tail can be averaged
    log_every: int = 50
    stop_at_step: int | None = None
    progress: bool = True
    ddp_timeout: float = 600.0  # under torchrun: seconds a rank waits for the others before the run ends with an error

    @property
    def split(self) -> SplitConfig:
        """The validation / fine-tune split of the ``real`` and ``val`` folders."""
        return SplitConfig(self.val_fraction, self.split_seed, self.split_block)

    def __post_init__(self) -> None:
        # Checked here, before any data loads: a bad value used to fail at step 1 after minutes of loading.
        rules = [
            (self.loss in ("focal", "ce"), f"--loss must be focal or ce, got {self.loss!r}"),
            (self.gamma >= 0, f"--gamma must be at least 0, got {self.gamma}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (0.0 <= self.real_ratio <= 1.0, f"--real-ratio must be between 0 and 1, got {self.real_ratio}"),
            (self.tps_lr_scale >= 0, f"--tps-lr-scale must be at least 0, got {self.tps_lr_scale}"),
            (self.point_loss >= 0, f"--point-loss must be at least 0, got {self.point_loss}"),
            (
                not self.rectifier_only or (self.point_loss > 0 and self.tps_lr_scale > 0),
                "--rectifier-only trains on the point loss alone: give --point-loss and --tps-lr-scale above 0",
            ),
            (
                not self.rectifier_points_only or self.point_loss > 0,
                "--rectifier-points-only teaches the rectifier with the point loss alone: give --point-loss",
            ),
            (not set(self.freeze) - set(FREEZABLE), f"--freeze takes {', '.join(FREEZABLE)}, got {' '.join(self.freeze)}"),
            (not set(FREEZABLE) <= set(self.freeze), "--freeze of every part leaves nothing to train"),
            (not (self.freeze and self.rectifier_only), "--rectifier-only freezes the encoder and decoder itself: drop --freeze"),
            (
                "rectifier" not in self.freeze or self.point_loss == 0,
                "--freeze rectifier with --point-loss: the point loss teaches the rectifier alone; drop one",
            ),
            (0 < self.distill_weight < float("inf"), f"--distill-weight must be positive and finite, got {self.distill_weight}"),
            (not (self.distill and self.rectifier_only), "--rectifier-only trains on the point loss alone: drop --distill"),
            # 1.0 is the default, so only a changed weight shows it was given; a weight with no term would be ignored silently.
            (self.distill or self.distill_weight == 1.0, "--distill-weight weighs the --distill term: give --distill"),
            (self.batch_size >= 1 and self.total_steps >= 1, "--batch-size and --total-steps must be at least 1"),
            (self.warmup_steps >= 0, f"--warmup-steps must be at least 0, got {self.warmup_steps}"),
            (0.0 <= self.min_lr_ratio <= 1.0, f"--min-lr-ratio must be between 0 and 1, got {self.min_lr_ratio}"),
            (self.amp in ("auto", "bf16", "off"), f"--amp must be auto, bf16 or off, got {self.amp!r}"),
            (self.ddp_timeout > 0, f"--ddp-timeout must be positive, got {self.ddp_timeout}"),
            (not self.stream_mix or self.stream_workers > 0, "--stream-mix changes the streamed crops: give --stream-workers"),
        ]
        problems = [message for ok, message in rules if not ok]
        if self.stream_mix:
            from .words import parse_mix  # here, not at the top: safl --help imports this module

            try:
                parse_mix(self.stream_mix, "--stream-mix")
            except ValueError as exc:
                problems.append(str(exc))
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


#: What ``safl train --init CKPT`` changes from the defaults when those flags are not given:
#: the recipe for fine-tuning a trained model on one's own crops. The from-scratch defaults
#: (lr 5e-4, a 1,000-step warm-up into a 100k-step schedule, a learning rectifier) took a
#: shipped model from 96.7 to 90.0 % on 30 validation crops of a user's folder. A small peak
#: lr, a short warm-up and schedule, and the rectifier frozen (when the recognition loss teaches
#: it, it squeezes the words and the encoder chases it: the model card's stage 4, and the
#: training log's v4-loc-b) keep the start;
#: the run validates at step 0, so ``best.safetensors`` is never worse than the start.
FINETUNE_DEFAULTS: dict[str, Any] = {"lr": 1e-4, "warmup_steps": 100, "total_steps": 2000, "min_lr_ratio": 0.1, "tps_lr_scale": 0.0}


def with_finetune_defaults(cfg: TrainConfig, given: set[str]) -> TrainConfig:
    """``cfg`` with ``FINETUNE_DEFAULTS`` for the fields not in ``given`` (the flags typed),
    when it starts from ``--init``; unchanged otherwise."""
    if cfg.init is None:
        return cfg
    return replace(cfg, **{k: v for k, v in FINETUNE_DEFAULTS.items() if k not in given})
