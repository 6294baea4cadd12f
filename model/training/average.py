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

``--mix`` weighs the inputs instead of averaging them uniformly: with two checkpoints, a model
and its fine-tuned continuation, ``--mix 0.3 0.7`` is the weight-space interpolation of WiSE-FT
(Wortsman et al. 2022, arXiv 2109.01903, section 2: θ = (1 − α)·θ₀ + α·θ₁, here α = 0.7),
which keeps more of the first model's behaviour the smaller α is::

    python -m model.training.average runs/wise.safetensors weights/safl.safetensors runs/v6/last.safetensors --mix 0.3 0.7
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from ..charset import token_ids
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


def average_checkpoints(paths: Sequence[Path], out: Path, name: str | None = None, mix: Sequence[float] | None = None) -> CheckpointInfo:
    """Write the average of the checkpoints ``paths`` to ``out`` and return its info; ``name``
    defaults to the first checkpoint's (e.g. ``safl-small``). ``mix`` gives each input's weight
    (positive; scaled to sum to 1), uniform if ``None``. The average reads the widest of their
    charsets; a token's rows (``TOKEN_ROW_PARAMS``) average over the inputs whose charset has it,
    their weights scaled to sum to 1 over those.

    Raises ``CheckpointError`` for fewer than two distinct inputs, an input given twice, an
    ``out`` that is one of the inputs (it would be overwritten before it is read), an
    unreadable input, inputs whose model configs (architecture, input geometry) differ other
    than in the charset, charsets that do not nest, or a ``mix`` that does not give one positive
    weight per input.
    """
    resolved = [Path(p).resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        raise CheckpointError("a checkpoint is given twice; each input counts once in a uniform average")
    if len(paths) < 2:
        raise CheckpointError("averaging needs at least two checkpoints")
    if Path(out).resolve() in resolved:
        raise CheckpointError(f"{out} is one of the inputs; write the average elsewhere (and promote it with model.training.ship)")
    if mix is None:
        mix = [1.0] * len(paths)
    if len(mix) != len(paths) or not all(0 < w < math.inf for w in mix):
        raise CheckpointError(f"--mix needs one positive, finite weight per checkpoint ({len(paths)}), got {list(mix)}")
    weights = [w / sum(mix) for w in mix]
    loaded = [load_checkpoint(p) for p in paths]
    first = loaded[0][1]
    for path, (_, info) in zip(paths[1:], loaded[1:], strict=True):
        if replace(info.config, charset="") != replace(first.config, charset=""):
            raise CheckpointError(f"{path} has another model config than {paths[0]}; only checkpoints of one architecture average")
    charset = _widest([info.config.charset for _, info in loaded])
    model = SAFL(replace(first.config, charset=charset))
    target = model.state_dict()
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in target.items() if v.is_floating_point()}
    rows = torch.zeros(model.charset.vocab_size, dtype=torch.float64)  # the weight of the inputs that have each token
    for (other, info), w in zip(loaded, weights, strict=True):
        ids = token_ids(info.config.charset, model.charset)
        rows[ids] += w
        for k, v in other.state_dict().items():
            if not v.is_floating_point():
                continue
            if k in TOKEN_ROW_PARAMS:
                total[k][ids] += w * v.double()
            else:
                total[k] += w * v.double()
    first_state = loaded[0][0].state_dict()
    mean = {}
    for k, v in target.items():
        if not v.is_floating_point():
            mean[k] = first_state[k]
        elif k in TOKEN_ROW_PARAMS:
            mean[k] = (total[k] / rows.view(-1, *[1] * (v.dim() - 1))).to(v.dtype)
        else:
            mean[k] = total[k].to(v.dtype)
    model.load_state_dict(mean)
    training: dict = {"averaged": [info.model_id for _, info in loaded]}
    if len(set(weights)) > 1:
        training["mix"] = weights
    return save_checkpoint(model, out, name=name or first.name, training=training)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="where to write the averaged checkpoint (.safetensors; the .json sidecar goes beside it)")
    p.add_argument("checkpoints", type=Path, nargs="+", help="two or more checkpoints of one architecture (charsets may nest)")
    p.add_argument("--name", help="model name recorded in the sidecar (default: the first checkpoint's, e.g. safl-small)")
    p.add_argument("--mix", type=float, nargs="+", metavar="W", help="one positive weight per checkpoint, in order, scaled to sum to 1 (default: uniform)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    try:
        info = average_checkpoints(args.checkpoints, args.out, args.name, args.mix)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    how = "the mean" if args.mix is None else f"the mix {' '.join(f'{w:g}' for w in args.mix)}"
    print(f"{info.model_id}: {how} of {len(args.checkpoints)} checkpoints → {info.weights_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
