"""Grow a trained SAFL into a bigger one that computes the same function (Net2Net-style).

Training a bigger model from scratch costs GPU time this project rarely has. Growing the
shipped one keeps everything it learned and only adds room to learn more: the new
encoder and decoder layers are appended with their residual outputs (attention output
projections, second FFN linear) zeroed, and widened FFNs get new hidden units whose
outgoing weights are zero. Each added piece starts as the identity on the residual
stream and learns from there.

    python -m model.training.grow weights/safl.safetensors runs/grown/init.safetensors \
        --enc-layers 4 --dec-layers 3 --ffn-mult 4
    python -m model.training.grow weights/safl.safetensors runs/g4-init.safetensors --grid-h 4

``--grid-h`` also gives the encoder more token-grid rows (SATRN's 2D feature map, section 3.1:
curved lines need more than one row of tokens to follow). The stem's height pool then keeps
more rows; no parameter changes shape, so every weight carries over, but the function does
change: the encoder sees ``grid_h / old grid_h`` times the tokens, and the model has to be trained on from there.
``--width`` does the same along the line. Both interpolate the position tables (the
config's ``pos_step_h`` / ``pos_step_w``; ViT, Dosovitskiy et al. 2021, section 3.2), so the
longer grid spans the positions the model was trained on: measured on the shipped lineage
(`20f0b56a81ad` grown to 256 pixels), IIIT5K's `val` part reads 47 % at once with
interpolated positions and 2 % without.

``--channels 3`` makes a grey model read colour (issue 31, lever 2): the first convolution
of the encoder's stem and of the rectifier's localisation net get the old weights times the
ITU-R 601 luma weights (0.299, 0.587, 0.114) for R, G and B, which is the grey conversion
Pillow's ``convert("L")`` makes, done inside the convolution (both convolutions are linear,
have no bias and pad with zeros; the weights sum to 1, so the [-1, 1] normalisation carries
over too). The grown model reads an RGB crop as the old one reads that crop in grey, up to
Pillow rounding its luma to whole grey levels, and learns colour contrast from there. It is
trained on colour renders (``safl synth --channels 3``).

    python -m model.training.grow weights/safl.safetensors runs/rgb-init.safetensors --channels 3
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from ..checkpoint import load_checkpoint, save_checkpoint
from ..safl import SAFL

#: Parameters whose output feeds the residual stream directly: zero them and a layer adds
#: nothing. ``attn.out_proj.`` also matches the decoder's ``self_attn`` and ``cross_attn``.
_RESIDUAL_OUTPUTS = ("attn.out_proj.", "ffn.net.3.")

#: ITU-R 601 luma weights of R, G, B: what ``PIL.Image.convert("L")`` computes (in 16-bit
#: fixed point, rounded to whole levels), and what ``model.preprocess`` gives a grey model.
LUMA = (0.299, 0.587, 0.114)

#: The convolutions that read the input image: ``[out, channels, k, k]`` weights.
_INPUT_CONVS = ("encoder.stem.net.0.weight", "rectifier.loc_net.0.weight")


def luma_weights(weight: torch.Tensor) -> torch.Tensor:
    """A grey convolution's weight ``[out, 1, k, k]`` as an RGB one ``[out, 3, k, k]`` that
    computes the same on the luma of its input: ``weight × LUMA`` along the channel axis
    (same dtype and device). Raises ``ValueError`` for a weight with more than one input channel."""
    if weight.dim() != 4 or weight.shape[1] != 1:
        raise ValueError(f"expected a grey convolution's weight [out, 1, k, k], got {tuple(weight.shape)}")
    return weight * torch.tensor(LUMA, dtype=weight.dtype, device=weight.device).view(1, 3, 1, 1)


def grow(
    model: SAFL,
    enc_layers: int,
    dec_layers: int,
    ffn_mult: int,
    grid_h: int | None = None,
    width: int | None = None,
    loc_grid: tuple[int, int] | None = None,
    channels: int | None = None,
) -> SAFL:
    """A model with at least as many layers and as wide FFNs as ``model``, with the same outputs;
    with ``grid_h`` (token-grid rows, at least the model's own) the same weights on a taller
    token grid, whose outputs differ until it is trained; with ``width`` (input pixels, at least
    the model's own) the same weights on a wider input: crops are stretched less, so long words
    get more token columns (``width / 4``), and the model must be trained on crops rendered at
    that width (``safl synth --width``). Both keep the position tables' span (``pos_step_h``,
    ``pos_step_w``: position interpolation). With ``loc_grid`` (rows, columns; at least the
    model's own) the rectifier's localisation net keeps that grid of cells of its feature map
    instead of their mean: the first fully connected layer reads each cell with the old
    weights divided by the number of cells, which is the same function (the mean of the cells
    times the old weights), so the rectifier predicts the same points until it is trained.
    With ``channels=3`` a grey model reads RGB ``[B, 3, H, W]`` input: its two input
    convolutions get ``luma_weights``, so it reads a colour crop as the grey model reads the
    crop's luma (module docstring).

    Raises ``ValueError`` for a smaller model, a ``channels`` other than the model's own or 3
    (a colour model cannot become grey), a locality-aware FFN, or a ``grid_h`` that does
    not divide the stem's feature-map height (``height / 4``: 1, 2, 4 or 8 for 32-pixel crops),
    or a ``width`` that is not a multiple of 4.
    """
    old = model.config
    loc_h, loc_w = (old.tps_loc_h, old.tps_loc_w) if loc_grid is None else loc_grid
    if loc_h < old.tps_loc_h or loc_w < old.tps_loc_w or (loc_h, loc_w) != (old.tps_loc_h, old.tps_loc_w) and (old.tps_loc_h, old.tps_loc_w) != (1, 1):
        raise ValueError("grow turns a 1 x 1 localisation grid into a larger one, and no other")
    grid_h = old.grid_h if grid_h is None else grid_h
    width = old.width if width is None else width
    if enc_layers < old.enc_layers or dec_layers < old.dec_layers or ffn_mult < old.ffn_mult or grid_h < old.grid_h or width < old.width:
        raise ValueError("grow only adds: layers, ffn_mult, grid_h and width must be at least the model's own")
    if old.locality_ffn:
        raise ValueError("growing a locality-aware FFN (convolutional) is not supported")
    channels = old.channels if channels is None else channels
    if channels not in (old.channels, 3):
        raise ValueError(f"grow turns a grey model (1 channel) into a colour one (3), not {old.channels} into {channels}")
    grown = old.preset if old.preset.endswith("-grown") else f"{old.preset}-grown"
    cfg = replace(
        old,
        preset=grown,
        enc_layers=enc_layers,
        dec_layers=dec_layers,
        ffn_mult=ffn_mult,
        grid_h=grid_h,
        width=width,
        # Position interpolation: a grid k times longer steps 1/k through the trained positions.
        pos_step_h=old.pos_step_h * old.grid_h / grid_h,
        pos_step_w=old.pos_step_w * old.width / width,
        tps_loc_h=loc_h,
        tps_loc_w=loc_w,
        channels=channels,
    )
    big = SAFL(cfg)  # the encoder's stem refuses a grid_h or width its strides cannot take
    src = model.state_dict()
    with torch.no_grad():
        for name, param in big.state_dict().items():
            if name not in src:  # a new layer: start as the identity on the residual stream
                if any(part in name for part in _RESIDUAL_OUTPUTS):
                    param.zero_()
                continue
            value = src[name]
            if value.shape == param.shape:
                param.copy_(value)
            elif name in _INPUT_CONVS and param.shape[1] == 3:
                param.copy_(luma_weights(value))  # grey from colour inside the convolution
            elif name.endswith("ffn.net.0.weight") or name.endswith("ffn.net.0.bias"):
                param[: value.shape[0]].copy_(value)  # the old hidden units; new ones keep their init
            elif name.endswith("ffn.net.3.weight"):
                param.zero_()
                param[:, : value.shape[1]].copy_(value)  # new hidden units contribute nothing yet
            elif name.startswith("rectifier.loc_net.") and name.endswith(".weight") and param.shape[1] == value.shape[1] * loc_h * loc_w:
                # Flatten orders the cells channel-major: cell k of channel c is input c * cells + k.
                param.copy_(value.repeat_interleave(loc_h * loc_w, dim=1) / (loc_h * loc_w))
            else:
                raise ValueError(f"cannot grow {name}: {tuple(value.shape)} → {tuple(param.shape)}")
    return big.eval()


def main(argv: list[str] | None = None) -> None:
    """Command line: grow a checkpoint file into another."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--enc-layers", type=int, help="encoder layers, at least the model's own (default: its own)")
    p.add_argument("--dec-layers", type=int, help="decoder layers, at least the model's own (default: its own)")
    p.add_argument("--ffn-mult", type=int, help="FFN width as a multiple of d_model, at least the model's own (default: its own)")
    p.add_argument("--grid-h", type=int, help="token-grid rows, at least the model's own and a divisor of height/4 (default: its own)")
    p.add_argument("--width", type=int, help="input width in pixels, at least the model's own and a multiple of 4 (default: its own)")
    p.add_argument(
        "--loc-grid",
        type=int,
        nargs=2,
        metavar=("ROWS", "COLS"),
        help="cells the rectifier's localisation net keeps of its feature map (default: its own, 1 1)",
    )
    p.add_argument("--channels", type=int, choices=(1, 3), help="input channels: 3 makes a grey model read RGB, the same at step 0 (default: its own)")
    args = p.parse_args(argv)
    model, info = load_checkpoint(args.src)
    c = model.config
    try:
        layers = (args.enc_layers or c.enc_layers, args.dec_layers or c.dec_layers, args.ffn_mult or c.ffn_mult)
        big = grow(model, *layers, args.grid_h, args.width, args.loc_grid, args.channels)
    except ValueError as exc:
        p.error(str(exc))
    training = dict(info.training or {}, grown_from=info.model_id)
    out = save_checkpoint(big, args.dst, name=f"safl-{big.config.preset}", training=training)
    print(f"{info.model_id} ({model.num_parameters() / 1e6:.2f} M params) → {out.model_id} ({big.num_parameters() / 1e6:.2f} M params): {args.dst}")


if __name__ == "__main__":
    main()
