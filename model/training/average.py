"""Average the weights of checkpoints of one architecture: a uniform "model soup" (Wortsman
et al. 2022, arXiv 2203.05482, section 2), which for fine-tuned models of one lineage often
reads better than each of them, at no training cost::

    python -m model.training.average runs/soup.safetensors weights/safl.safetensors runs/r7-long/last.safetensors

Every floating-point tensor (weights and batch-norm statistics) becomes the mean of the inputs';
integer buffers (batch-norm step counts) are taken from the first. The result is an ordinary
checkpoint: compare it with ``model.training.compare`` and ship it with ``model.training.ship``
like any other. Its sidecar names the checkpoints it averages.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, CheckpointInfo, load_checkpoint, save_checkpoint


def average_checkpoints(paths: Sequence[Path], out: Path, name: str | None = None) -> CheckpointInfo:
    """Write the uniform average of the checkpoints ``paths`` to ``out`` and return its info;
    ``name`` defaults to the first checkpoint's (e.g. ``safl-small``).

    Raises ``CheckpointError`` for fewer than two distinct inputs, an input given twice, an
    ``out`` that is one of the inputs (it would be overwritten before it is read), an
    unreadable input, or inputs whose model configs (architecture, charset, input geometry) differ.
    """
    resolved = [Path(p).resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        raise CheckpointError("a checkpoint is given twice; each input counts once in a uniform average")
    if len(paths) < 2:
        raise CheckpointError("averaging needs at least two checkpoints")
    if Path(out).resolve() in resolved:
        raise CheckpointError(f"{out} is one of the inputs; write the average elsewhere (and promote it with model.training.ship)")
    model, first = load_checkpoint(paths[0])
    total = {k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    sources = [first.model_id]
    for path in paths[1:]:
        other, info = load_checkpoint(path)
        if info.config != first.config:
            raise CheckpointError(f"{path} has another model config than {paths[0]}; only checkpoints of one architecture average")
        for k, v in other.state_dict().items():
            if v.is_floating_point():
                total[k] += v.double()
        sources.append(info.model_id)
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    model.load_state_dict({k: (v / len(paths)).to(dtypes[k]) if v.is_floating_point() else v for k, v in total.items()})
    return save_checkpoint(model, out, name=name or first.name, training={"averaged": sources})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="where to write the averaged checkpoint (.safetensors; the .json sidecar goes beside it)")
    p.add_argument("checkpoints", type=Path, nargs="+", help="two or more checkpoints of one architecture")
    p.add_argument("--name", help="model name recorded in the sidecar (default: the first checkpoint's, e.g. safl-small)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    try:
        info = average_checkpoints(args.checkpoints, args.out, args.name)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{info.model_id}: the mean of {len(args.checkpoints)} checkpoints → {info.weights_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
