"""The resumable SAFL trainer.

A run lives in one folder (``--out``)::

    config.json         the TrainConfig the run was started with
    state.pt            model + optimizer + schedule + RNG + step (tensors only, loaded
                        with ``weights_only=True``), written atomically every few minutes
    last.safetensors    the latest weights as a servable checkpoint (+ .json sidecar)
    best.safetensors    the weights with the best mean validation accuracy so far
    step-NNNNNN.safetensors  with --keep-val-checkpoints: the weights of each validation
    log.jsonl           one JSON object per log interval and per validation

``--resume`` continues exactly where the state left off: the same batches, the same
augmentation draws, the same learning-rate schedule. Ctrl-C or SIGTERM (``docker stop``,
a machine shutting down) stops a run after its current step and saves the state first;
a second Ctrl-C aborts at once.

Under ``torchrun`` each process trains its share of every (global) batch with
DistributedDataParallel and rank 0 alone writes the folder (``config.json`` then records
the ``world_size``, which ``--resume`` requires again): see ``model.training.distributed``.
"""

from __future__ import annotations

import gc
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ..charset import NUM_SPECIAL, PAD_ID, Charset, token_ids
from ..checkpoint import CheckpointError, load_checkpoint, read_info, save_checkpoint
from ..decode import TOKEN_ROW_PARAMS
from ..device import DeviceUnavailable, resolve_device
from ..loss import distill_loss, point_loss, sequence_loss
from ..preprocess import ViewConfig, to_tensor
from ..rectify import point_targets
from ..safl import SAFL, SAFLConfig
from .config import TrainConfig
from .data import ArrayDataset, augment_with_points, degrade, load_any, load_folder_part, shard_meta
from .distributed import Ranks, derived_seed, stream_seed
from .evaluate import evaluate
from .resume import write_saved
from .stream import RenderStream
from .words import TextMix, parse_mix

#: What validation reads: the service's default views, so validation numbers are what it answers.
VAL_VIEWS = ViewConfig()


class TrainingSetupError(ValueError):
    """A run that cannot start as configured (no data, no GPU, mismatched twins): a user error."""


def val_checkpoint_name(step: int) -> str:
    """The file ``--keep-val-checkpoints`` writes the weights validated at ``step`` to."""
    return f"step-{step:06d}.safetensors"


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 (AVX512-BF16 or AMX), which makes autocast pay off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Batch(NamedTuple):
    """One training step's data."""

    images: torch.Tensor  # float [B, C, H, W], normalised and augmented
    inp: torch.Tensor  # decoder input tokens [B, T] (BOS + characters)
    tgt: torch.Tensor  # decoder targets [B, T] (characters + EOS, PAD after)
    #: where each crop's text edges lie after augmentation (float32 [B, F, 2], normalised;
    #: NaN rows for crops without rendered geometry), or None when no crop has any
    points: torch.Tensor | None = None


class BatchSampler:
    """Draws batches from the synthetic pool (or render stream) and, for ``real_ratio`` of
    each batch, the real one.

    ``batch(step)`` hands the same batch to every caller at one step, so runs trained in
    lockstep (``train_lockstep``) see identical data.

    Under torchrun (``world_size`` > 1) ``cfg.batch_size`` is the global batch and this
    rank's batch is its share, positions ``rank, rank + world_size, ...`` of it
    (``model.training.distributed``); a render stream is this rank's own.
    """

    def __init__(
        self,
        synth: ArrayDataset | RenderStream,
        real: ArrayDataset | None,
        cfg: TrainConfig,
        charset: Charset,
        gen: torch.Generator,
        device: torch.device | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.synth, self.real, self.cfg, self.charset, self.gen = synth, real, cfg, charset, gen
        self.device = device or torch.device("cpu")  # where augmentation runs (the training device)
        n_real = round(cfg.batch_size * cfg.real_ratio) if real is not None and len(real) else 0
        streaming = isinstance(synth, RenderStream)
        if not streaming and len(synth) == 0 and n_real == 0:
            raise TrainingSetupError("no training data: give --synth and/or --real with --real-ratio > 0")
        if cfg.batch_size < world_size:
            raise TrainingSetupError(f"--batch-size {cfg.batch_size} is the global batch, shared out over {world_size} processes: give at least {world_size}")
        self.n_real = cfg.batch_size if not streaming and len(synth) == 0 else n_real
        self.n_synth = cfg.batch_size - self.n_real
        self.rank, self.world_size = rank, world_size
        self.n_synth_mine = len(range(rank, self.n_synth, world_size))  # this rank's synthetic crops per step
        # Which crops form the batch: drawn from ``gen``, in the same state on every rank.
        # Augmentation: from ``gen`` too in a single process, else from a generator of this
        # rank's own, re-seeded every step (``batch``), so a resume needs no state of it.
        self.aug_gen = gen if world_size == 1 else torch.Generator()
        self._cached: tuple[int, Batch] | None = None

    def seek(self, step: int) -> None:
        """Position a render stream where a run resumed at ``step`` continues."""
        if isinstance(self.synth, RenderStream):
            self.synth.seek(step * self.n_synth_mine)
        self._cached = None

    def batch(self, step: int) -> Batch:
        """The batch of ``step`` (drawn once, then repeated for other callers at that step)."""
        if self._cached is None or self._cached[0] != step:
            if self.aug_gen is not self.gen:
                self.aug_gen.manual_seed(derived_seed(self.cfg.seed, "augment", self.rank, step))
            self._cached = (step, self.next())
        return self._cached[1]

    def next(self) -> Batch:
        """Normalised, augmented images, decoder input/target tokens and fiducial points."""
        parts, labels, points = [], [], []
        if isinstance(self.synth, RenderStream):
            if self.n_synth_mine > 0:
                images, synth_labels, synth_points = self.synth.take(self.n_synth_mine)
                parts.append(images)
                labels += synth_labels
                points.append(synth_points)
            sources = ((self.real, self.n_real, self.n_synth),)
        else:
            sources = ((self.synth, self.n_synth, 0), (self.real, self.n_real, self.n_synth))
        for ds, n, first in sources:  # ``first``: the global batch position of the source's first crop
            if n <= 0 or ds is None:
                continue
            idx = torch.randint(len(ds), (n,), generator=self.gen).numpy()
            idx = idx[(self.rank - first) % self.world_size :: self.world_size]  # this rank's positions
            parts.append(ds.images[idx])
            labels += [ds.labels[i] for i in idx]
            points.append(ds.points[idx] if ds.points is not None else None)
        images = to_tensor(torch.cat([torch.from_numpy(p) for p in parts]).to(self.device))
        known = [p for p in points if p is not None]
        pts = None
        if known:
            f = known[0].shape[1]
            pts = torch.from_numpy(
                np.concatenate([p if p is not None else np.full((len(part), f, 2), np.nan) for p, part in zip(points, parts)]).astype(np.float32)
            )
            pts = pts.to(self.device)
        images, pts = augment_with_points(images, pts, self.aug_gen, self.cfg.augment)
        images = degrade(images, self.aug_gen, self.cfg.degrade)
        inp, tgt = self.charset.encode_batch(labels)
        return Batch(images, inp, tgt, pts)

    def close(self) -> None:
        """Stop a render stream's workers."""
        if isinstance(self.synth, RenderStream):
            self.synth.close()


@dataclass
class _Window:
    """Sums over the steps since the last log line (or over the whole invocation)."""

    loss: float = 0.0
    data: float = 0.0  # seconds spent getting batches
    total: float = 0.0  # seconds per step, data included
    n: int = 0
    distill: float = 0.0  # the --distill term (unweighted), a part of loss

    def add(self, other: _Window) -> None:
        self.loss += other.loss
        self.distill += other.distill
        self.data += other.data
        self.total += other.total
        self.n += other.n


def _synth_source(path: Path) -> dict[str, Any]:
    """A synthetic folder as a checkpoint records it: its path and, for ``safl synth`` shards,
    the renderer version, seed and crop count their ``meta.json`` gives."""
    meta = shard_meta(path) or {}
    return {"path": str(path), **{k: meta[k] for k in ("renderer_version", "seed", "count") if k in meta}}


@dataclass
class _LoopState:
    """What ``Trainer.advance`` carries from one step to the next within one invocation."""

    start: float
    last_ckpt: float
    bar: Any  # tqdm
    window: _Window = field(default_factory=_Window)
    totals: _Window = field(default_factory=_Window)
    last_loss: float = float("nan")
    stopped_by: str = "steps"
    lockstep: bool = False  # train_lockstep takes the timed checkpoints, for all runs at one step
    stop: _GracefulStop | None = None  # run(): a Ctrl-C / SIGTERM stops after the current step


class _GracefulStop:
    """While active, the first SIGINT or SIGTERM only asks the loop to stop after the
    current step, so the saved state matches a step boundary and resumes exactly; a
    second SIGINT interrupts at once. Outside the main thread it installs nothing."""

    def __init__(self, say: bool = True) -> None:
        self.requested = False
        self.say = say  # under torchrun rank 0 alone says it
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if self.say:
            print(f"\n{signal.Signals(signum).name}: stopping after this step and saving the state (Ctrl-C again aborts at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class _Teacher(NamedTuple):
    """A ``--distill`` teacher: the frozen model, each of its token ids in the student's
    vocabulary (``ids``) and each student id in its own, −1 where it has none (``to_teacher``)."""

    model: SAFL
    model_id: str
    ids: torch.Tensor
    to_teacher: torch.Tensor


class Trainer:
    """Builds data, model and optimiser from a ``TrainConfig`` and runs the loop."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, share_data_with: Trainer | None = None, ranks: Ranks | None = None) -> None:
        self.dist = ranks or Ranks()  # under torchrun: this process's rank of the job
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        state_path = self.out / "state.pt"
        # cfg is final (model.training.resume.resolve): the saved config is not read again here.
        self.resumed = resume and state_path.is_file()
        self.cfg = cfg
        torch.set_num_threads(cfg.threads)
        try:
            self.device = self.dist.device(resolve_device(cfg.device))
        except DeviceUnavailable as exc:
            raise TrainingSetupError(f"--device: {exc}") from None
        use_amp = cfg.amp == "bf16" or (cfg.amp == "auto" and (self.device.type == "cuda" or cpu_has_bf16()))
        self.amp_dtype = torch.bfloat16 if use_amp else None

        torch.manual_seed(cfg.seed)
        last = self.out / "last.safetensors"
        if self.resumed and last.is_file():
            # The architecture the saved state was trained with (a preset's defaults may have
            # changed since, e.g. monotone TPS points in format 3).
            self.model_cfg = read_info(last, verify=False).config
            model = SAFL(self.model_cfg)
        elif cfg.init:
            model, info = load_checkpoint(cfg.init)
            if cfg.reset_tps:
                model = with_identity_tps(model)
            if cfg.charset is not None:
                model = with_charset(model, read_charset(cfg.charset))
            self.model_cfg = model.config
        else:
            overrides = {} if cfg.charset is None else {"charset": read_charset(cfg.charset)}
            self.model_cfg = SAFLConfig.from_preset(cfg.preset, **overrides)
            model = SAFL(self.model_cfg)
        self.charset = model.charset
        if (cfg.point_loss > 0 or cfg.rectifier_only) and model.rectifier is None:
            raise TrainingSetupError("--point-loss / --rectifier-only teach the rectifier, and this model has none (use_tps is off)")
        if cfg.rectifier_only and self.dist.enabled:
            raise TrainingSetupError("--rectifier-only runs in one process: its few seconds a step need no torchrun")
        # Before the data loads (minutes of shards): a teacher that cannot serve fails at once.
        self.teacher = self._load_teacher(cfg.distill) if cfg.distill else None
        self.last_distill = 0.0  # the latest step's --distill term, for the log
        if share_data_with is not None:
            # A lockstep twin: the same batches, augmentation draws and validation sets.
            self.val_sets, self.gen, self.sampler = share_data_with.val_sets, share_data_with.gen, share_data_with.sampler
            self.n_train, self.data_sources = share_data_with.n_train, share_data_with.data_sources
        else:
            self._build_data(cfg)  # before the model touches the GPU: render workers are forked
        self.dist.start(self.device, cfg.ddp_timeout)  # after the fork, too
        # Channels-last convolutions with the fused AdamW kernel: 1.07-1.13x the images/s of a
        # step on 2 CPU cores, bf16 or fp32 (measured in alternating rounds: the training log).
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self._train_mode()

        groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
        for n, p in self.model.named_parameters():
            no_decay = p.dim() < 2 or n == "decoder.pos"
            groups.setdefault((n.startswith("rectifier."), no_decay), []).append(p)
        self.fused_adamw = self.device.type in ("cpu", "cuda")
        self.opt = torch.optim.AdamW(
            [
                {"params": ps, "lr": cfg.lr * (cfg.tps_lr_scale if tps else 1.0), "weight_decay": 0.0 if nd else cfg.weight_decay}
                for (tps, nd), ps in sorted(groups.items())
            ],
            lr=cfg.lr,
            betas=(0.9, 0.98),
            fused=self.fused_adamw,
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, self.cfg))
        self.step = 0
        self.train_seconds = 0.0
        self.best = -1.0
        self.start_val: dict[str, Any] = {}  # validation of the --init weights at step 0
        self.last_mean: float | None = None  # mean 36-char accuracy of the latest validation
        if self.resumed:
            self._load_state(state_path)
        elif self.dist.is_main:  # the world size too: --resume refuses another one
            write_saved(self.out, cfg, self.dist.world_size)
        if share_data_with is None:
            self.sampler.seek(self.step)
        if cfg.point_loss > 0 and self.sampler.batch(self.step).points is None:
            raise TrainingSetupError("--point-loss: no training crop carries fiducial points; render --synth with `safl synth` (renderer 4 or later)")
        if cfg.rectifier_only:
            for name, p in self.model.named_parameters():
                p.requires_grad_(name.startswith("rectifier."))
        for name, p in self.model.named_parameters():
            if name.split(".")[0] in cfg.freeze:
                p.requires_grad_(False)  # no gradient, so AdamW leaves it (and its weight decay) alone
        if self.teacher is not None:
            self.teacher = self.teacher._replace(
                model=self.teacher.model.to(self.device, memory_format=torch.channels_last),
                ids=self.teacher.ids.to(self.device),
                to_teacher=self.teacher.to_teacher.to(self.device),
            )
        self.net = self.dist.wrap(self.model)  # what train_step runs: under torchrun, DDP around self.model
        self._loop: _LoopState | None = None

    def _load_teacher(self, path: str) -> _Teacher:
        """The ``--distill`` teacher, frozen, on the CPU (``__init__`` moves it after the render
        workers fork). It reads the student's batch, so its input geometry must be the same and
        its decoder as long; its architecture may differ (a bigger model teaching a smaller)."""
        try:
            teacher, info = load_checkpoint(path)
        except (CheckpointError, OSError) as exc:
            raise TrainingSetupError(f"--distill: {exc}") from None
        if info.config.preprocess != self.model_cfg.preprocess or info.config.max_len < self.model_cfg.max_len:
            geometry = [f"{p.height}x{p.width}x{p.channels} up to {c.max_len} characters" for c in (info.config, self.model_cfg) for p in [c.preprocess]]
            raise TrainingSetupError(f"--distill: {path} reads {geometry[0]}, the run {geometry[1]}; a teacher reads the run's own batches")
        missing = "".join(ch for ch in info.config.charset if ch not in self.charset)
        if missing:
            raise TrainingSetupError(f"--distill: the run's charset lacks the teacher's {missing!r}; the teacher's charset must nest in the run's")
        ids = token_ids(info.config.charset, self.charset)
        to_teacher = torch.full((self.charset.vocab_size,), -1, dtype=torch.int64)
        to_teacher[ids] = torch.arange(len(ids))
        return _Teacher(teacher.eval().requires_grad_(False), info.model_id, ids, to_teacher)

    def _distill_term(self, images: torch.Tensor, inp: torch.Tensor, tgt: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The distillation term on the crops whose labels the teacher can read (its charset may
        lack a character the run learns, e.g. the space), and the bool mask ``[B, T]`` of the tokens
        it averages over."""
        t = self.teacher
        t_inp, t_tgt = t.to_teacher[inp], t.to_teacher[tgt]
        readable = ((t_inp >= 0).all(1) & (t_tgt >= 0).all(1)).unsqueeze(1)
        with torch.no_grad():
            t_logits = t.model(images, t_inp.clamp(min=0))
        mask = readable & (tgt != PAD_ID)
        return distill_loss(logits, t_logits, t.ids, mask), mask

    def _build_data(self, cfg: TrainConfig) -> None:
        pcfg = self.model_cfg.preprocess
        if cfg.stream_workers > 0:
            from .synth import RENDERER_VERSION, SynthConfig

            seed = stream_seed(cfg.stream_seed, self.dist.rank)  # each rank renders crops of its own
            chars = self.charset.chars
            # A model reading the space sees phrases; --stream-mix changes the rest.
            mix = parse_mix(cfg.stream_mix, "--stream-mix", TextMix.for_charset(chars))
            try:
                # Here, not in the render workers: a worker that fails to start is restarted forever.
                mix.check_charset(chars)
            except ValueError as exc:
                raise TrainingSetupError(f"--stream-mix phrase: {exc}") from None
            scfg = SynthConfig(
                seed=seed, charset=chars, max_len=self.model_cfg.max_len, height=pcfg.height, width=pcfg.width, channels=pcfg.channels, text_mix=mix
            )
            synth: ArrayDataset | RenderStream = RenderStream(scfg, cfg.stream_workers)
            n_synth: int | str = "streamed"
            synth_sources: list[dict[str, Any]] = [
                {"stream": True, "renderer_version": RENDERER_VERSION, "seed": cfg.stream_seed, "text_mix": asdict(scfg.text_mix)}
            ]
        else:
            synth_sets = [load_any(p, pcfg).filtered(self.charset, self.model_cfg.max_len) for p in cfg.synth]
            synth = _concat(synth_sets, "synth", pcfg)
            n_synth = len(synth)
            synth_sources = [_synth_source(p) for p in cfg.synth]
        # Recorded in every checkpoint and the resumable state: which data trained the weights.
        self.data_sources = {"synthetic": synth_sources, "real": [str(p) for p in cfg.real], "real_ratio": cfg.real_ratio}
        real_sets = []
        for p in cfg.real:
            part = load_folder_part(p, pcfg, "train", cfg.split, view_cfg=None)
            kept = part.filtered(self.charset, self.model_cfg.max_len)
            reasons = self.charset.drop_reasons(part.labels, self.model_cfg.max_len)
            if reasons and self.dist.is_main:
                print(f"{part.name}: {len(part) - len(kept)} of {len(part)} labels left out of training ({reasons})", flush=True)
            real_sets.append(kept)
        real = _concat(real_sets, "real", pcfg) if real_sets else None
        # Rank 0 alone validates: the other ranks leave the validation sets unloaded.
        self.val_sets = [load_folder_part(p, pcfg, "val", cfg.split, view_cfg=VAL_VIEWS) for p in cfg.val] if self.dist.is_main else []
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.sampler = BatchSampler(synth, real, cfg, self.charset, self.gen, self.device, self.dist.rank, self.dist.world_size)
        self.n_train = (n_synth, len(real) if real is not None else 0)

    # -- state ---------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "step": self.step,
            "train_seconds": self.train_seconds,
            "best": self.best,
            "val_views": asdict(VAL_VIEWS),
            "data": self.data_sources,
            "rng_data": self.gen.get_state(),
            "rng_torch": torch.get_rng_state(),
            "teacher": self.teacher.model_id if self.teacher is not None else None,
        }

    def _load_state(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        for group in self.opt.param_groups:
            # load_state_dict restores the saved kernel choice too: a state saved before the
            # fused kernel (fused=None) would otherwise resume on the slower per-tensor loop.
            group["fused"], group["foreach"] = self.fused_adamw, None if self.fused_adamw else group.get("foreach")
        self.sched.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.train_seconds = float(state["train_seconds"])
        self.best = float(state["best"])
        saved_teacher = state.get("teacher")
        teacher = self.teacher.model_id if self.teacher is not None else None
        if saved_teacher is not None and saved_teacher != teacher:
            # --distill names a path: a model shipped to it since would silently teach another run.
            raise TrainingSetupError(
                f"--resume: the run was distilled from {saved_teacher}, and --distill now gives {teacher or 'no teacher'}; resume with that teacher"
            )
        if state.get("val_views") != asdict(VAL_VIEWS):
            # The best checkpoint was chosen under other views (the contrast views were on by
            # default until 2026-11-30): scores under different views do not compare.
            if self.dist.is_main:
                print(f"--resume: validation now reads {VAL_VIEWS}; the best score so far was measured with other views and starts again", flush=True)
            self.best = -1.0
        if state.get("data", self.data_sources) != self.data_sources and self.dist.is_main:
            # Not refused: a moved folder is the same data. A re-rendered or re-streamed one is not
            # (a renderer version bump changes every crop), and the checkpoint's record says so.
            print(f"--resume: the run started on {state['data']}; it continues on {self.data_sources}", flush=True)
        self.gen.set_state(state["rng_data"].cpu())  # map_location moved it to the device
        torch.set_rng_state(state["rng_torch"].cpu())

    def save_state(self) -> None:
        """Write the full resumable state and the latest servable weights (atomic; rank 0 only:
        the ranks hold the same weights and the same batch generator, and re-seed the rest)."""
        if not self.dist.is_main:
            return
        _atomic_torch_save(self._state(), self.out / "state.pt")
        save_checkpoint(self.model, self.out / "last.safetensors", name=f"safl-{self.model_cfg.preset}", training=self.training_meta())

    def training_meta(self, val: dict | None = None) -> dict[str, Any]:
        """What a checkpoint records about how it was trained."""
        meta = {
            "step": self.step,
            "images_seen": self.step * self.cfg.batch_size,
            "train_hours": round(self.train_seconds / 3600, 3),
            "cpu_hours": round(self.train_seconds * self.cfg.threads * self.dist.world_size / 3600, 3) if self.device.type == "cpu" else None,
            "device": self.device.type,
            "loss": self.cfg.loss,
            "gamma": self.cfg.gamma if self.cfg.loss == "focal" else 0.0,
            "run": self.out.name,
            "data": self.data_sources,
        }
        if self.teacher is not None:
            meta["distill"] = {"teacher": self.teacher.model_id, "weight": self.cfg.distill_weight}
        if self.dist.enabled:
            meta["world_size"] = self.dist.world_size  # train_hours is wall time: device hours are this many times it
        if val is not None:
            meta["val"] = val
        return meta

    # -- loop ------------------------------------------------------------------------------

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.out / "log.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def _train_mode(self) -> None:
        # A frozen rectifier (--tps-lr-scale 0) stays frozen whole: its BatchNorm layers
        # would otherwise keep updating their running statistics, and so its warp.
        self.model.train()
        if self.cfg.tps_lr_scale == 0 and self.model.rectifier is not None:
            self.model.rectifier.eval()
        if self.cfg.rectifier_only:
            # The recogniser is frozen whole, its BatchNorm statistics included.
            self.model.eval()
            self.model.rectifier.train()
        for part in self.cfg.freeze:
            module = getattr(self.model, part)
            if module is not None:
                module.eval()
        if self.cfg.hold_bn_stats:
            for module in self.model.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def validate(self) -> dict[str, Any]:
        """Validation metrics per set; saves ``best`` when the mean 36-char accuracy improves."""
        if not self.val_sets:
            return {}
        self.model.eval()
        results = evaluate(self.model, self.val_sets, worst=0)
        self._train_mode()
        val = {r.name: {"n": r.n, "acc36": round(r.acc36, 4), "acc_cs": round(r.acc_cs, 4), "ned": round(r.one_minus_ned, 4)} for r in results}
        mean = sum(r.acc36 for r in results) / len(results)
        val["mean_acc36"] = round(mean, 4)
        self.last_mean = round(mean, 4)
        self._log({"step": self.step, "images": self.step * self.cfg.batch_size, "train_hours": round(self.train_seconds / 3600, 4), "val": val})
        name = f"safl-{self.model_cfg.preset}"
        if mean > self.best:
            self.best = mean
            save_checkpoint(self.model, self.out / "best.safetensors", name=name, training=self.training_meta(val))
        if self.cfg.keep_val_checkpoints:
            save_checkpoint(self.model, self.out / val_checkpoint_name(self.step), name=name, training=self.training_meta(val))
        return val

    def _val_line(self, val: dict[str, Any]) -> str:
        return f"{self.out.name} step {self.step}: val " + ", ".join(f"{k} {v['acc36']:.3f}" for k, v in val.items() if isinstance(v, dict))

    def train_step(self) -> tuple[float, float, float]:
        """One optimisation step; returns (loss, data seconds, total seconds)."""
        t0 = time.perf_counter()
        images, inp, tgt, points = self.sampler.batch(self.step)
        nb = self.device.type == "cuda"
        images, inp, tgt = images.to(self.device, non_blocking=nb), inp.to(self.device, non_blocking=nb), tgt.to(self.device, non_blocking=nb)
        images = images.contiguous(memory_format=torch.channels_last)
        t1 = time.perf_counter()
        ctx = torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)
        cfg = self.cfg
        targets = None
        if cfg.point_loss > 0 and points is not None:
            targets = point_targets(points.to(self.device), self.model_cfg.tps_max_offset, self.model_cfg.width / self.model_cfg.height)
        with ctx:
            if cfg.rectifier_only:
                loss = cfg.point_loss * point_loss(self.model.rectifier.points(images), targets)
            elif targets is not None:
                logits, predicted = self.net(images, inp, return_points=True, detach_points=cfg.rectifier_points_only)
            else:
                logits = self.net(images, inp)
        if not cfg.rectifier_only:
            loss = sequence_loss(logits, tgt, cfg.loss, cfg.gamma)
            if targets is not None:
                loss = loss + cfg.point_loss * point_loss(predicted, targets)
        if self.dist.enabled:
            # This rank's token mean, weighted by its share of the batch's tokens: the gradient
            # DDP averages over the ranks is then the global batch's token mean. The loss
            # returned is this rank's part of the global loss, times the world size.
            loss = loss * self.dist.token_share(tgt)
        if self.teacher is not None:
            with ctx:
                term, distilled = self._distill_term(images, inp, tgt, logits)
            self.last_distill = float(term.detach())
            # The distilled tokens are a subset (no phrases), so their own share, not the tokens'.
            loss = loss + cfg.distill_weight * term * self.dist.share(distilled)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip)
        self.opt.step()
        self.sched.step()
        self.step += 1
        t2 = time.perf_counter()
        self.train_seconds += t2 - t0
        return float(loss.detach()), t1 - t0, t2 - t0

    def end_step(self) -> int:
        """The step this invocation stops at (``total_steps`` or ``stop_at_step``)."""
        return min(self.cfg.total_steps, self.cfg.stop_at_step or self.cfg.total_steps)

    def begin(self, bar: bool = True) -> None:
        """Announce the run and reset the loop's counters (before the first ``advance``)."""
        from tqdm import tqdm

        cfg = self.cfg
        say = self.dist.is_main  # rank 0 alone prints
        ranks = f" ×{self.dist.world_size} ({self.dist.backend})" if self.dist.enabled else ""
        if say:
            total, trained = sum(p.numel() for p in self.model.parameters()), self.model.num_parameters()
            params = f"{total / 1e6:.2f} M params" + (f", {trained / 1e6:.2f} M of them trained" if trained != total else "")
            print(
                f"training {self.model_cfg.preset} ({params}) on {self.device}{ranks}, "
                f"amp={self.amp_dtype}, threads={cfg.threads}, loss={cfg.loss}"
                f"{f' gamma={cfg.gamma}' if cfg.loss == 'focal' else ''}"
                f"{f' + {cfg.distill_weight:g} × distillation from {cfg.distill}' if cfg.distill else ''}; data: {self.n_train[0]} synthetic + {self.n_train[1]} real; "
                f"{'resumed at' if self.resumed else 'starting at'} step {self.step} → {self.out}",
                flush=True,
            )
        if cfg.warmup_steps >= cfg.total_steps and say:
            print(
                f"warning: --warmup-steps {cfg.warmup_steps} is not below --total-steps {cfg.total_steps}: the learning rate never reaches its peak", flush=True
            )
        if cfg.init and self.val_sets and self.step == 0:
            # The start point is a candidate too: best.safetensors starts as --init's weights.
            self.start_val = self.validate()
            print(self._val_line(self.start_val) + " (the --init weights)", flush=True)
        now = time.monotonic()
        progress = tqdm(total=self.end_step(), initial=self.step, unit="step", disable=not (cfg.progress and bar and say), dynamic_ncols=True)
        self._loop = _LoopState(start=now, last_ckpt=now, bar=progress)

    def _loop_state(self) -> _LoopState:
        if self._loop is None:
            raise RuntimeError("begin() must be called before advance() / finish()")
        return self._loop

    def advance(self) -> bool:
        """One step with its logging, validation and checkpointing; True when the run should stop."""
        cfg, loop = self.cfg, self._loop_state()
        if self.step >= self.end_step():
            return True
        loss, data_s, total_s = self.train_step()
        loop.last_loss = loss
        loop.window.add(_Window(loss, data_s, total_s, 1, self.last_distill))
        bar = loop.bar
        bar.update(1)
        if self.step % cfg.log_every == 0 or self.step == self.end_step():
            w = loop.window
            if self.dist.enabled:  # the global batch's loss: each rank's part (train_step) summed
                w.loss = self.dist.sum([w.loss])[0] / self.dist.world_size
            rec = {
                "step": self.step,
                "images": self.step * cfg.batch_size,
                "loss": round(w.loss / w.n, 5),
                "lr": max(self.sched.get_last_lr()),
                "img_s": round(cfg.batch_size * w.n / w.total, 1),
                "data_ms": round(1000 * w.data / w.n, 2),
                "step_ms": round(1000 * w.total / w.n, 2),
                "train_hours": round(self.train_seconds / 3600, 4),
            }
            if self.teacher is not None:  # how far the run has moved from its teacher (this rank's crops)
                rec["distill"] = round(w.distill / w.n, 5)
            self._log(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", img_s=rec["img_s"], data=f"{100 * w.data / w.total:.1f}%")
            loop.totals.add(w)
            loop.window = _Window()
        if cfg.val_every and self.step % cfg.val_every == 0:
            val = self.validate()
            if val:
                bar.write(self._val_line(val))
        now = time.monotonic()
        if not loop.lockstep and now - loop.last_ckpt > cfg.checkpoint_minutes * 60:
            self.save_state()
            loop.last_ckpt = now
        over_budget = cfg.max_minutes is not None and now - loop.start > cfg.max_minutes * 60
        interrupted = loop.stop is not None and loop.stop.requested
        if self.dist.enabled:  # all ranks stop at one step, whichever of them saw the clock or the signal
            over_budget, interrupted = self.dist.any(over_budget, interrupted)
        if over_budget:
            loop.stopped_by = "time budget"
            return True
        if self.step >= self.end_step():
            return True
        if interrupted:
            loop.stopped_by = "interrupted"
        return interrupted

    def finish(self) -> dict[str, Any]:
        """Validate where the last validation was not at this step (so every run with ``--val``
        leaves a ``best.safetensors``), save the state and summarise the invocation's speed."""
        loop = self._loop_state()
        loop.bar.close()
        # Not after Ctrl-C / SIGTERM: the state is saved at once (a container stop gives seconds).
        if self.val_sets and self.step > 0 and loop.stopped_by != "interrupted" and not (self.cfg.val_every and self.step % self.cfg.val_every == 0):
            val = self.validate()  # rank 0 alone has validation sets
            print(self._val_line(val), flush=True)
        start, last = self.start_val.get("mean_acc36"), self.last_mean
        if start is not None and last is not None and last < start:
            print(
                f"note: the last validation ({last:.4f}) is below the --init weights' ({start:.4f}); best.safetensors "
                f"holds the best seen ({self.best:.4f}), the start itself if nothing beat it",
                flush=True,
            )
        self.save_state()
        totals = loop.totals
        totals.add(loop.window)  # the steps since the last log line: a run shorter than --log-every trained too
        loop.window = _Window()
        n = max(totals.n, 1)
        summary = {
            "run": str(self.out),
            "step": self.step,
            "stopped_by": loop.stopped_by,
            "loss": self.dist.sum([loop.last_loss])[0] / self.dist.world_size,  # under torchrun: each rank's part summed
            "img_s": round(self.cfg.batch_size * n / totals.total, 1) if totals.total else None,
            "data_ms": round(1000 * totals.data / n, 2),
            "step_ms": round(1000 * totals.total / n, 2),
            "data_share": round(totals.data / totals.total, 4) if totals.total else None,
        }
        if self.dist.is_main and not totals.n:
            print(f"{self.out.name}: already at step {self.step} of {self.end_step()}: nothing to train", flush=True)
        elif self.dist.is_main:
            print(
                f"{self.out.name}: stopped at step {self.step} ({loop.stopped_by}); {summary['img_s']} img/s; data {summary['data_ms']} ms "
                f"of {summary['step_ms']} ms per step ({100 * (summary['data_share'] or 0):.1f} %)",
                flush=True,
            )
        return summary

    def run(self) -> dict[str, Any]:
        """Train until ``total_steps``, ``stop_at_step`` or ``max_minutes``; returns a summary."""
        try:
            # Under torchrun a failed collective (a rank died or stalled) ends the run with one clear line.
            with _GracefulStop(say=self.dist.is_main) as stop, self.dist.failures(lambda: f"step {self.step + 1}"):
                self.begin()
                self._loop_state().stop = stop
                while not self.advance():
                    pass
                return self.finish()
        finally:
            self.sampler.close()


def train_lockstep(trainers: list[Trainer]) -> list[dict[str, Any]]:
    """Run trainers that share one ``BatchSampler`` step by step, so every run sees the
    very same batches: the controlled comparison of, say, focal loss against CE.

    All stop together, at the first step where any of them would stop.
    """
    try:
        steps = {t.step for t in trainers}
        if len(steps) != 1:  # refused inside the try: a render stream's workers are stopped too
            raise TrainingSetupError(f"lockstep runs must resume at the same step, got {sorted(steps)}: resume them separately first")
        with _GracefulStop() as stop:
            for i, t in enumerate(trainers):
                t.begin(bar=i == 0)
                t._loop_state().lockstep = True  # timed checkpoints are taken below, for all at one step
            last_ckpt = time.monotonic()
            while True:
                stops = [t.advance() for t in trainers]
                if time.monotonic() - last_ckpt > trainers[0].cfg.checkpoint_minutes * 60:
                    for t in trainers:
                        t.save_state()
                    last_ckpt = time.monotonic()
                if any(stops) or stop.requested:
                    reason = next((t._loop_state().stopped_by for t, s in zip(trainers, stops) if s), "interrupted")
                    for t in trainers:
                        t._loop_state().stopped_by = reason  # all stop for the reason the first one gave
                    break
            return [t.finish() for t in trainers]
    finally:
        trainers[0].sampler.close()


def with_identity_tps(model: SAFL) -> SAFL:
    """The same network with a fresh, identity-initialised, bounded, monotone TPS head (other
    weights kept), as a new model on the CPU; ``model`` itself is left as it was."""
    cfg = replace(model.config, tps_max_offset=SAFLConfig.tps_max_offset, tps_monotone=SAFLConfig.tps_monotone)
    fresh = SAFL(cfg)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("rectifier.fc.")}
    fresh.load_state_dict(state, strict=False)
    return fresh


def read_charset(value: str) -> str:
    """``--charset``: the characters of a UTF-8 file when ``value`` names one (its line ends
    dropped), else ``value`` itself. Raises ``TrainingSetupError`` for an empty set or one
    with a character twice."""
    path = Path(value)
    chars = path.read_text(encoding="utf-8").replace("\r", "").replace("\n", "") if path.is_file() else value
    try:
        Charset(chars)
    except ValueError as exc:
        raise TrainingSetupError(f"--charset: {exc}") from None
    return chars


def with_charset(model: SAFL, chars: str) -> SAFL:
    """The same network reading ``chars``, as a new model on the CPU; ``model`` is left as it was.

    Every weight is kept. The decoder's character embedding and output layer keep the rows
    of the special tokens and of the characters both sets share, so a crop reads as before
    (a dropped character's share of probability goes to the rest); a new character's
    embedding starts as PyTorch's default and its output row at zero weights with a bias 10
    below the lowest trained one, so it is not read until training raises it.
    """
    fresh = SAFL(replace(model.config, charset=chars))
    old_ids, new_ids = [], []
    for ch in chars:
        if ch in model.charset:
            old_ids.append(model.charset.encode(ch)[0])
            new_ids.append(fresh.charset.encode(ch)[0])
    keep_old = torch.tensor(list(range(NUM_SPECIAL)) + old_ids)
    keep_new = torch.tensor(list(range(NUM_SPECIAL)) + new_ids)
    state = model.state_dict()
    fresh.load_state_dict({k: v for k, v in state.items() if k not in TOKEN_ROW_PARAMS}, strict=False)
    with torch.no_grad():
        dec = fresh.decoder
        dec.embed.weight[keep_new] = state["decoder.embed.weight"][keep_old]
        dec.head.weight.zero_()
        dec.head.bias.fill_(float(state["decoder.head.bias"].min()) - 10.0)
        dec.head.weight[keep_new] = state["decoder.head.weight"][keep_old]
        dec.head.bias[keep_new] = state["decoder.head.bias"][keep_old]
    return fresh


def _concat(sets: list[ArrayDataset], name: str, pcfg) -> ArrayDataset:
    import numpy as np

    if not sets:
        shape = (0, pcfg.height, pcfg.width) if pcfg.channels == 1 else (0, pcfg.height, pcfg.width, 3)
        return ArrayDataset(name, np.zeros(shape, np.uint8), [])
    if len(sets) == 1:
        return sets[0]
    return ArrayDataset(name, np.concatenate([s.images for s in sets]), [lab for s in sets for lab in s.labels])


def train(cfg: TrainConfig, resume: bool = False, twin: TrainConfig | None = None, ranks: Ranks | None = None) -> dict[str, Any]:
    """Build a trainer and run it (the ``safl train`` entry point).

    With ``twin``, a second run (same data, other loss or init) trains in lockstep. Under
    torchrun (``ranks``, by default from the environment) this process trains its rank's
    share with DistributedDataParallel (``model.training.distributed``).
    """
    ranks = ranks or Ranks.from_env()
    if ranks.enabled:
        if twin is not None:
            raise TrainingSetupError("--twin-out trains two runs in one process: not under torchrun; train the two runs one after the other")
        trainer = Trainer(cfg, resume=resume, ranks=ranks)
        try:
            summary = trainer.run()
        finally:
            # DDP (its reducer) goes first: a process that exits with it alive can abort in gloo's teardown.
            trainer.net = trainer.model
            gc.collect()
        ranks.close()  # not after a failure: a barrier with a lost rank would only wait out the timeout
        return summary
    first = Trainer(cfg, resume=resume)
    if twin is None:
        return first.run()
    try:
        second = Trainer(twin, resume=resume, share_data_with=first)
    except BaseException:
        first.sampler.close()
        raise
    summaries = train_lockstep([first, second])
    return {"runs": summaries}
