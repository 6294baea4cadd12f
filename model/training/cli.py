"""Argument parsing and entry points for ``safl synth``, ``safl train`` and ``safl eval``.

Lives in ``model.training`` so training works without the service installed; the
``safl`` command (``service.cli``) mounts these subcommands.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, fields
from pathlib import Path

from ..engine import ENGINES
from ..preprocess import ViewConfig
from .config import TrainConfig
from .split import DEFAULT_SPLIT, FAIR_PART, PARTS, SplitConfig
from .words import SPACED_PHRASE_WEIGHT, TextMix, parse_mix


def add_synth_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="render synthetic word crops into shards", description="Render a deterministic synthetic training set.")
    p.add_argument("--out", type=Path, default=Path("data/synth"), help="output folder (default: data/synth)")
    p.add_argument("--count", type=int, default=500000, help="number of crops (default: 500000)")
    p.add_argument("--seed", type=int, default=0, help="data set seed (default: 0)")
    p.add_argument("--workers", type=int, default=2, help="render processes (default: 2)")
    p.add_argument("--shard-size", type=int, default=50000, help="crops per shard (default: 50000)")
    p.add_argument("--format", choices=("npy", "lmdb"), default="npy", help="npy shards (fast) or STR-layout LMDB")
    p.add_argument(
        "--width",
        type=int,
        default=128,
        help="input width in pixels, a multiple of 4 (default: 128, the presets'; a model grown wider with grow --width trains on crops rendered at its own)",
    )
    p.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        default=1,
        help="1: grey crops (default); 3: colour crops, [N, H, W, 3] shards, for a model grown with grow --channels 3",
    )
    p.add_argument(
        "--mix",
        action="append",
        default=[],
        metavar="KIND=WEIGHT",
        help="weight of one kind of label string, repeatable (kinds and defaults: "
        + ", ".join(f"{k}={v}" for k, v in asdict(TextMix()).items())
        + "; weights are normalised; phrase > 0 adds the space to the renderer's charset)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    from ..charset import DEFAULT_CHARS
    from .synth import SynthConfig, render_dataset

    try:
        mix = parse_mix(args.mix)
    except ValueError as e:
        print(f"safl synth: {e}", file=sys.stderr)
        return 2
    if args.width < 8 or args.width % 4:
        print(f"safl synth: --width {args.width}: the encoder's stem needs a multiple of 4, at least 8", file=sys.stderr)
        return 2
    # Phrases are words joined by spaces: the renderer's charset must hold the space to draw them.
    charset = DEFAULT_CHARS + " " if mix.phrase > 0 else DEFAULT_CHARS
    cfg = SynthConfig(seed=args.seed, charset=charset, text_mix=mix, width=args.width, channels=args.channels)
    render_dataset(args.out, args.count, cfg, args.workers, args.shard_size, args.format, progress=not args.no_progress)
    return 0


#: Help for every ``safl train`` flag (``TrainConfig`` field → text); the default is appended.
TRAIN_HELP = {
    "out": "run folder: config.json, log.jsonl, state.pt, last/best.safetensors",
    "preset": "model size for a new model: tiny (tests), small (CPU), base (GPU)",
    "init": "checkpoint to start from (fine-tuning or a warm restart); the fine-tune recipe then sets --lr, --warmup-steps, "
    "--total-steps, --min-lr-ratio and --tps-lr-scale where not given, and the start is validated at step 0",
    "reset_tps": "with --init: re-initialise the rectifier's last layer as the identity (monotone points)",
    "charset": "the characters the model reads, as a string or a UTF-8 file holding them (a space in it is a character too, so "
    "multi-word crops read with their spaces); with --init, the characters both sets share keep their trained rows",
    "synth": "synthetic data: shard folders (safl synth), LMDBs or labels.tsv folders",
    "stream_workers": "render synthetic crops on the fly in this many processes instead of --synth (under torchrun: per process, each with a seed of "
    f"its own); the default text mix, with phrases at weight {SPACED_PHRASE_WEIGHT:g} when the charset holds the space (--stream-mix changes it)",
    "stream_seed": "renderer seed of the stream (seed 0 is the default `safl synth` set)",
    "real": "labels.tsv folders of real crops: their fine-tune part is trained on (model.training.split)",
    "real_ratio": "share of each batch drawn from --real",
    "val": "labels.tsv folders: their validation part is reported and picks best.safetensors",
    "val_fraction": "share of the contiguous blocks that form the validation part",
    "split_seed": "seed of the validation block draw",
    "split_block": "crops per contiguous block of the split (a scene's crops stay on one side)",
    "loss": "focal (the paper) or ce (cross entropy)",
    "gamma": "focal loss exponent; 0 is cross entropy",
    "batch_size": "crops per step, in all: under torchrun the global batch, each process training on its 1/N share (64 gives the most updates per CPU-second)",
    "lr": "peak learning rate (AdamW)",
    "tps_lr_scale": "the rectifier's learning rate as a multiple of --lr",
    "point_loss": "weight of the fiducial-point loss: the rectifier learns where the text's edges lie from the geometry "
    "`safl synth` stores with each crop (renderer 4); crops without it (real ones) add recognition loss only",
    "rectifier_only": "train the rectifier alone on the point loss (encoder and decoder frozen, no recognition loss): "
    "the first stage of teaching a rectifier held at the identity",
    "freeze": "parts of the network that do not train, their BatchNorm statistics and dropout held too: rectifier, encoder, "
    "decoder (e.g. --freeze rectifier encoder: the decoder alone learns, say a new character, on the encoder's features)",
    "rectifier_points_only": "the point loss alone teaches the rectifier while everything trains: the recognition loss's gradient "
    "stops at the warp (when it reached the rectifier, it taught it to cut off the first letter)",
    "hold_bn_stats": "BatchNorm layers normalise with the --init model's running statistics and keep them while their weights "
    "train (detectron2's FrozenBatchNorm): a continuation's statistics otherwise drift to its batches' mix within a few hundred steps",
    "distill": "a teacher checkpoint (its charset within the run's, the same input geometry) whose next-character distributions the run is held to on "
    "every crop whose label the teacher can read, beside the recognition loss: knowledge distillation against forgetting, "
    "e.g. --distill of the --init model while a new character is learnt",
    "distill_weight": "weight of the --distill term (KL divergence from the teacher, per character)",
    "weight_decay": "AdamW weight decay (not on biases, norms or positions)",
    "warmup_steps": "linear warm-up steps before the cosine decay",
    "total_steps": "length of the schedule; the run stops there",
    "min_lr_ratio": "the cosine ends at this fraction of --lr",
    "clip": "gradient-norm clipping",
    "seed": "seed of initialisation, batch draws and augmentation",
    "augment": "strength of the geometric and photometric augmentation, 0 to switch it off",
    "degrade": "share of each batch given street-photo degradations (low resolution, washed out, gamma, inverted)",
    "threads": "PyTorch threads (use all cores of an otherwise idle machine); under torchrun, per process",
    "amp": "auto (bf16 where the CPU or GPU has it), bf16 or off",
    "device": "auto, cpu or cuda",
    "max_minutes": "stop (and save) after this many minutes",
    "checkpoint_minutes": "save the resumable state this often",
    "val_every": "validate every N steps (and always at the end of a run)",
    "stream_mix": "with --stream-workers: KIND=WEIGHT changes of the streamed text mix, the kinds of safl synth --mix (default: the "
    "renderer's mix, with phrases for a charset holding the space; phrase needs a charset with the space)",
    "keep_val_checkpoints": "keep the weights of every validation as step-NNNNNN.safetensors (step 0 with --init, each --val-every step, "
    "the end of each invocation), to average a run's tail (model.training.average); give it again with each --resume",
    "log_every": "write a log.jsonl line every N steps",
    "stop_at_step": "stop (and save) at this step without changing the schedule",
    "progress": "",
    "ddp_timeout": "under torchrun: seconds a process waits for the others (a validation pass on rank 0 included) before "
    "the run ends with an error naming the lost rank",
}


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train or fine-tune a model (resumable)", description="Train SAFL; see model/training/train.py.")
    defaults = TrainConfig()
    # SUPPRESS: only the flags given on the command line appear in the namespace, so
    # `--resume` can tell a contradicting flag from a default (run_train).
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        text = f"{TRAIN_HELP[f.name]} (default: {value})"
        if f.name == "progress":
            p.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS, help="no progress bar")
        elif isinstance(value, list):
            metavar = {"stream_mix": "KIND=WEIGHT", "freeze": "PART"}.get(f.name, "DIR")
            # extend: a repeated flag adds to the list (--stream-mix a=1 --stream-mix b=2), as safl synth --mix does
            p.add_argument(flag, nargs="+", action="extend", default=argparse.SUPPRESS, metavar=metavar, help=TRAIN_HELP[f.name])
        elif isinstance(value, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        elif f.name in ("max_minutes",):
            p.add_argument(flag, type=float, default=argparse.SUPPRESS, help=text)
        elif f.name in ("stop_at_step",):
            p.add_argument(flag, type=int, default=argparse.SUPPRESS, help=text)
        elif f.name in ("init", "charset", "distill"):
            p.add_argument(flag, default=argparse.SUPPRESS, help=TRAIN_HELP[f.name])
        elif f.name in ("val_fraction", "real_ratio", "degrade"):
            p.add_argument(flag, type=_fraction, default=argparse.SUPPRESS, help=text)
        elif f.name in ("split_block", "batch_size", "total_steps"):
            p.add_argument(flag, type=_positive_int, default=argparse.SUPPRESS, help=text)
        else:
            p.add_argument(flag, type=type(value), default=argparse.SUPPRESS, help=text)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its state.pt (a missing state starts afresh)")
    p.add_argument("--override-saved", action="store_true", help="with --resume: the run-defining flags given win over the saved run's (refused without it)")
    twin = p.add_argument_group("lockstep twin", "a second run trained on the very same batches, differing only in loss and/or init")
    twin.add_argument("--twin-out", help="the twin's run folder (enables the twin)")
    twin.add_argument("--twin-loss", choices=("focal", "ce"), help="the twin's loss (default: the same as --loss)")
    twin.add_argument("--twin-gamma", type=float, help="the twin's focal gamma (default: --gamma)")
    twin.add_argument("--twin-init", help="the twin's starting checkpoint (default: --init)")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from .distributed import DistributedError, Ranks
    from .resume import STATE_FILE, read_saved, resolve, write_saved

    # Under torchrun every process runs this. Rank 0 alone says why a run cannot start; the
    # others leave quietly with status 0, since torchrun ends the whole job as soon as one
    # process fails, which could silence rank 0 before it says it (its own status is the job's).
    ranks = Ranks.from_env()
    refuse = lambda message: SystemExit(message if ranks.is_main else 0)
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    out = Path(given.get("out", TrainConfig.out))
    try:
        run = resolve(read_saved(out), given, args.resume, (out / STATE_FILE).is_file(), args.override_saved, ranks.world_size)
    except (OSError, ValueError) as exc:  # a refused config or resume, an unreadable config.json
        raise refuse(f"safl train: {exc}") from None
    cfg = run.config
    if ranks.launched and ranks.is_main:
        low, high = cfg.batch_size // ranks.world_size, -(-cfg.batch_size // ranks.world_size)
        print(
            f"ddp world_size={ranks.world_size}: --batch-size {cfg.batch_size} is the global batch, {low if low == high else f'{low}-{high}'} "
            "crops per process; rank 0 validates, logs and saves",
            flush=True,
        )
    if run.finetune and ranks.is_main:
        print(
            "fine-tuning from --init: "
            + ", ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in run.finetune.items())
            + " (the fine-tune recipe; flags given win)",
            flush=True,
        )
    if run.rewrite_saved:  # --override-saved: the run continues as changed, and a later --resume keeps the change
        write_saved(out, cfg, ranks.world_size)
    twin = None
    if args.twin_out:
        if Path(args.twin_out).resolve() == Path(cfg.out).resolve():
            raise refuse("--twin-out must differ from --out")
        twin_given = asdict(cfg) | {
            "out": args.twin_out,
            "loss": args.twin_loss or cfg.loss,
            "gamma": cfg.gamma if args.twin_gamma is None else args.twin_gamma,
            "init": args.twin_init or cfg.init,
        }
        twin_out = Path(args.twin_out)
        try:  # the twin's own folder, resumed by the same rule: every value of the twin counts as given
            twin_run = resolve(read_saved(twin_out), twin_given, args.resume, (twin_out / STATE_FILE).is_file(), args.override_saved, ranks.world_size)
        except (OSError, ValueError) as exc:
            raise refuse(f"safl train: --twin-out {twin_out}: {exc}") from None
        twin = twin_run.config
        if twin_run.rewrite_saved:
            write_saved(twin_out, twin, ranks.world_size)
    from ..checkpoint import CheckpointError
    from .train import TrainingSetupError, train

    try:
        summary = train(cfg, resume=args.resume, twin=twin, ranks=ranks)
    except DistributedError:
        raise SystemExit(1) from None  # said already, the moment it happened
    except (TrainingSetupError, CheckpointError, FileNotFoundError) as exc:
        raise refuse(f"safl train: {exc}") from None
    if ranks.is_main:
        print(json.dumps(summary))
    return 0


def add_eval_parser(sub: argparse._SubParsersAction, default_weights: Path | None) -> None:
    p = sub.add_parser(
        "eval", help="word accuracy of a checkpoint on labelled folders", description="Evaluate a checkpoint (STR 36-char protocol and case-sensitive)."
    )
    p.add_argument("--weights", type=Path, default=default_weights, required=default_weights is None, help="checkpoint (.safetensors)")
    p.add_argument("--data", type=Path, nargs="+", required=True, metavar="DIR", help="labels.tsv folders, shard folders or LMDBs")
    p.add_argument(
        "--part",
        choices=PARTS,
        default="all",
        help="which part of a labels.tsv folder (model.training.split); val-unseen: the validation crops no model "
        "warm-started from safl-small@a659eaef27c4 trained on",
    )
    add_split_flags(p)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--backend",
        choices=ENGINES,
        default="auto",
        help="inference engine, as safl serve's: onnx (ONNX Runtime, the CPU default; the same readings), torch, auto (default: %(default)s)",
    )
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--worst", type=int, default=5, help="most confident mistakes to list per data set")
    p.add_argument(
        "--lexicon-size",
        type=int,
        default=0,
        metavar="N",
        help="also report accuracy with a closed vocabulary per crop: its label and N-1 distractors drawn from the other labels "
        "(the IIIT5K protocol uses 50); 0: off (default)",
    )
    p.add_argument(
        "--raw-confidence",
        action="store_true",
        help="score the decoder's own probability, not the confidence calibrated by the checkpoint's sidecar (model.calibration)",
    )
    p.add_argument("--reliability", type=Path, metavar="PNG", help="also draw the reliability diagram of all the data sets' crops here")
    add_view_flags(p)
    p.set_defaults(func=run_eval)


def add_split_flags(p: argparse.ArgumentParser) -> None:
    """``--val-fraction``, ``--split-seed``, ``--split-block``: the ``SplitConfig`` of a
    labelled folder's validation / fine-tune parts (``split_config(args)``)."""
    d = DEFAULT_SPLIT
    p.add_argument("--val-fraction", type=_fraction, default=d.val_fraction, help="share of the blocks in the validation part (default: %(default)s)")
    p.add_argument("--split-seed", type=int, default=d.seed, help="seed of the block draw (default: %(default)s)")
    p.add_argument("--split-block", type=_positive_int, default=d.block, help="crops per contiguous block of the split, in source order (default: %(default)s)")


def add_comparison_part_flag(p: argparse.ArgumentParser) -> None:
    """``--part``: which validation crops two checkpoints are compared on (``ship``, ``compare``)."""
    p.add_argument(
        "--part",
        choices=("val", "val-unseen"),
        default=FAIR_PART,
        help="val-unseen (default while the shipped model is of the legacy lineage, which trained on most of val) or val",
    )


def split_config(args: argparse.Namespace) -> SplitConfig:
    """The ``SplitConfig`` of parsed ``add_split_flags`` arguments."""
    return SplitConfig(args.val_fraction, args.split_seed, args.split_block)


def add_view_flags(p: argparse.ArgumentParser) -> None:
    """``--turn-tall/--no-turn-tall`` and ``--contrast-views/--no-contrast-views``: the
    ``model.preprocess.ViewConfig`` a reader uses (``view_config(args)``)."""
    default = ViewConfig()
    p.add_argument(
        "--turn-tall",
        action=argparse.BooleanOptionalAction,
        default=default.turn_tall,
        help="also read a crop taller than wide turned 90° each way (default: %(default)s)",
    )
    p.add_argument(
        "--contrast-views",
        action=argparse.BooleanOptionalAction,
        default=default.contrast,
        help="also read each crop contrast-stretched and histogram-equalised (default: %(default)s)",
    )
    p.add_argument(
        "--views-confident-at",
        type=_fraction,
        default=default.confident_at,
        metavar="P",
        help="read a crop's further views only when it alone reads less confidently than P; 1 reads them all (default: %(default)s)",
    )


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text}")
    return value


def view_config(args: argparse.Namespace) -> ViewConfig:
    """The ``ViewConfig`` of parsed ``add_view_flags`` arguments."""
    return ViewConfig(turn_tall=args.turn_tall, contrast=args.contrast_views, confident_at=args.views_confident_at)


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from ..calibration import read_calibration
    from ..checkpoint import CheckpointError, load_checkpoint
    from ..engine import EngineUnavailable, open_engine
    from .data import load_any, load_folder_part
    from .evaluate import evaluate, pooled_reliability, to_json, to_markdown

    torch.set_num_threads(args.threads)
    view_cfg = view_config(args)
    sets = []
    try:
        model, info = load_checkpoint(args.weights)
        engine = open_engine(model, info.model_id, args.backend, "cpu", args.threads)
        calibration = None if args.raw_confidence else read_calibration(args.weights)
        pcfg = info.config.preprocess
        for d in args.data:
            if (d / "labels.tsv").is_file() and args.part != "all":
                sets.append(load_folder_part(d, pcfg, args.part, split_config(args), view_cfg))
            else:
                sets.append(load_any(d, pcfg, view_cfg))
    except (CheckpointError, EngineUnavailable, OSError, ValueError) as exc:
        # A missing or broken checkpoint or calibration, an engine that cannot run, a labels.tsv line without a tab, a missing image file.
        raise SystemExit(f"safl eval: {exc}") from None
    try:
        results = evaluate(engine, sets, args.batch_size, args.worst, view_cfg.confident_at, args.lexicon_size, calibration)
    except ValueError as exc:  # a data set with fewer distinct labels than --lexicon-size
        raise SystemExit(f"safl eval: {exc}") from None
    print(to_markdown(results, f"{info.model_id} ({args.part})"))
    if args.json:
        to_json(results, args.json, {"model": info.model_id, "part": args.part, "split": asdict(split_config(args)), "calibrated": calibration is not None})
    if args.reliability:
        from .reliability_plot import plot_reliability

        everything = pooled_reliability(results)
        if everything is not None:
            kind = "calibrated" if calibration is not None else "raw"
            plot_reliability(everything, args.reliability, f"{info.model_id}, {args.part}, {kind} confidence")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m model.training.cli`` entry point (training subcommands only)."""
    parser = argparse.ArgumentParser(prog="safl-train")
    sub = parser.add_subparsers(dest="command", required=True)
    add_synth_parser(sub)
    add_train_parser(sub)
    add_eval_parser(sub, None)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
