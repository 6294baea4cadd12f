"""Average the weights of checkpoints of one architecture: a uniform "model soup" (Wortsman
et al. 2022, arXiv 2203.05482, section 2), which for fine-tuned models of one lineage often
reads better than each of them, at no training cost::

    python -m model.training.average runs/soup.safetensors weights/safl.safetensors runs/r7-long/last.safetensors

Every floating-point tensor (weights and batch-norm statistics) becomes the mean of the inputs';
integer buffers (batch-norm step counts) are taken from the first. The charsets may differ if
they nest (a model and its continuation trained with ``--charset`` over more characters, e.g.
the space): the average reads the largest, and each token's embedding and output row is the
mean over the inputs that have the token. A model that never learnt a character has no row of
it worth averaging (``with_charset`` gives it a placeholder that is never read), so a new
character keeps the row it was trained with. That alone need not keep it read: ``v5-space``
averaged with the model it grew from read 2 % of clean phrases with their spaces (stop 36),
the rest of the decoder halfway back to a model that never wrote one. The result is an
ordinary checkpoint: compare it with ``model.training.compare`` and ship it with
``model.training.ship`` like any other. Its sidecar names the checkpoints it averages.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from ..charset import NUM_SPECIAL, Charset
from ..checkpoint import CheckpointError, CheckpointInfo, load_checkpoint, save_checkpoint
from ..decode import TOKEN_ROW_PARAMS
from ..safl import SAFL


def _widest(charsets: Sequence[str]) -> str:
    """The one charset that holds every other's characters. Raises ``CheckpointError`` if none does."""
    widest = max(charsets, key=len)
    for cs in charsets:
        missing = set(cs) - set(widest)
        if missing:
            raise CheckpointError(
                f"the charsets do not nest: {''.join(sorted(missing))!r} is missing from the widest ({len(widest)} characters); only checkpoints whose charsets nest average"
            )
    return widest


def _token_ids(charset: str, into: Charset) -> torch.Tensor:
    """For each token id of ``charset`` (specials first), its id in ``into``."""
    return torch.tensor(list(range(NUM_SPECIAL)) + [into.encode(ch)[0] for ch in charset])


def average_checkpoints(paths: Sequence[Path], out: Path, name: str | None = None) -> CheckpointInfo:
    """Write the uniform average of the checkpoints ``paths`` to ``out`` and return its info;
    ``name`` defaults to the first checkpoint's (e.g. ``safl-small``). The average reads the
    widest of their charsets; a token's rows (``TOKEN_ROW_PARAMS``) average over the inputs
    whose charset has it.

    Raises ``CheckpointError`` for fewer than two distinct inputs, an input given twice, an
    ``out`` that is one of the inputs (it would be overwritten before it is read), an
    unreadable input, inputs whose model configs (architecture, input geometry) differ other
    than in the charset, or charsets that do not nest.
    """
    resolved = [Path(p).resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        raise CheckpointError("a checkpoint is given twice; each input counts once in a uniform average")
    if len(paths) < 2:
        raise CheckpointError("averaging needs at least two checkpoints")
    if Path(out).resolve() in resolved:
        raise CheckpointError(f"{out} is one of the inputs; write the average elsewhere (and promote it with model.training.ship)")
    loaded = [load_checkpoint(p) for p in paths]
    first = loaded[0][1]
    for path, (_, info) in zip(paths[1:], loaded[1:], strict=True):
        if replace(info.config, charset="") != replace(first.config, charset=""):
            raise CheckpointError(f"{path} has another model config than {paths[0]}; only checkpoints of one architecture average")
    charset = _widest([info.config.charset for _, info in loaded])
    model = SAFL(replace(first.config, charset=charset))
    target = model.state_dict()
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in target.items() if v.is_floating_point()}
    rows = torch.zeros(model.charset.vocab_size, dtype=torch.float64)  # how many inputs have each token
    for other, info in loaded:
        ids = _token_ids(info.config.charset, model.charset)
        rows[ids] += 1
        for k, v in other.state_dict().items():
            if not v.is_floating_point():
                continue
            if k in TOKEN_ROW_PARAMS:
                total[k][ids] += v.double()
            else:
                total[k] += v.double()
    first_state = loaded[0][0].state_dict()
    mean = {}
    for k, v in target.items():
        if not v.is_floating_point():
            mean[k] = first_state[k]
        elif k in TOKEN_ROW_PARAMS:
            mean[k] = (total[k] / rows.view(-1, *[1] * (v.dim() - 1))).to(v.dtype)
        else:
            mean[k] = (total[k] / len(paths)).to(v.dtype)
    model.load_state_dict(mean)
    return save_checkpoint(model, out, name=name or first.name, training={"averaged": [info.model_id for _, info in loaded]})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="where to write the averaged checkpoint (.safetensors; the .json sidecar goes beside it)")
    p.add_argument("checkpoints", type=Path, nargs="+", help="two or more checkpoints of one architecture (charsets may nest)")
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
