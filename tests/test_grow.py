"""Growing a model keeps what it computes (model.training.grow)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from model.charset import BOS_ID
from model.checkpoint import load_checkpoint, save_checkpoint
from model.preprocess import collate, preprocess
from model.safl import SAFL, SAFLConfig
from model.training.grow import LUMA, grow, main
from model.training.synth import Renderer, SynthConfig


def _trained_looking(cfg: SAFLConfig) -> SAFL:
    # Random but non-zero everywhere, so a copied-wrong parameter shows in the outputs.
    torch.manual_seed(0)
    model = SAFL(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_grown_model_computes_the_same_and_saves(tmp_path) -> None:
    small = _trained_looking(SAFLConfig.from_preset("tiny"))
    big = grow(small, enc_layers=3, dec_layers=2, ffn_mult=4)
    assert (big.config.enc_layers, big.config.dec_layers, big.config.ffn_mult) == (3, 2, 4)
    assert big.num_parameters() > small.num_parameters()
    images = torch.rand(3, 1, 32, 128) * 2 - 1
    tokens = torch.randint(3, len(small.charset.chars), (3, 7))
    with torch.no_grad():
        assert torch.allclose(small(images, tokens), big(images, tokens), atol=1e-5)
        assert [r.text for r in small.recognize(images)] == [r.text for r in big.recognize(images)]
    # The grown model is an ordinary checkpoint: it saves, loads and trains like any other.
    info = save_checkpoint(big, tmp_path / "grown.safetensors", name="grown")
    loaded, loaded_info = load_checkpoint(tmp_path / "grown.safetensors")
    assert loaded_info.config == big.config and loaded_info.sha256 == info.sha256
    big.train()
    big(images, tokens).sum().backward()
    new_layer = big.encoder.layers[-1]
    assert new_layer.attn.out_proj.weight.grad.abs().sum() > 0  # the zeroed output learns first


def test_grow_refuses_to_shrink() -> None:
    model = SAFL(SAFLConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match="only adds"):
        grow(model, enc_layers=0, dec_layers=1, ffn_mult=2)
    with pytest.raises(ValueError, match="only adds"):
        grow(SAFL(SAFLConfig.from_preset("tiny", grid_h=2)), enc_layers=1, dec_layers=1, ffn_mult=2, grid_h=1)
    with pytest.raises(ValueError, match="must divide"):
        grow(model, enc_layers=1, dec_layers=1, ffn_mult=2, grid_h=3)


def test_more_grid_rows_keep_every_weight_and_double_the_tokens() -> None:
    small = _trained_looking(SAFLConfig.from_preset("tiny", grid_h=2))
    tall = grow(small, enc_layers=1, dec_layers=1, ffn_mult=2, grid_h=4)
    assert tall.config.grid_h == 4 and tall.config.pos_step_h == 0.5
    assert torch.allclose(tall.encoder.pos.pe_h[::2], small.encoder.pos.pe_h, atol=1e-6)
    src = small.state_dict()
    assert all(torch.equal(v, src[k]) for k, v in tall.state_dict().items())
    images = torch.rand(2, 1, 32, 128) * 2 - 1
    with torch.no_grad():
        assert tall.encoder(images).shape[1] == 2 * small.encoder(images).shape[1] == 4 * 32


def test_the_command_line_grows_the_grid_alone_and_refuses_bad_rows(tmp_path, capsys) -> None:
    src = save_checkpoint(_trained_looking(SAFLConfig.from_preset("tiny")), tmp_path / "src.safetensors", name="safl-tiny").weights_path
    main([str(src), str(tmp_path / "tall.safetensors"), "--grid-h", "2"])
    tall, info = load_checkpoint(tmp_path / "tall.safetensors")
    assert info.config.grid_h == 2 and info.config.enc_layers == 1 and info.training["grown_from"].startswith("safl-tiny@")
    with pytest.raises(SystemExit) as exc:
        main([str(src), str(tmp_path / "bad.safetensors"), "--grid-h", "3"])
    assert exc.value.code == 2 and "must divide" in capsys.readouterr().err
    assert not (tmp_path / "bad.safetensors").exists()


def test_a_wider_input_keeps_every_weight_and_widens_the_token_grid() -> None:
    small = _trained_looking(SAFLConfig.from_preset("tiny"))
    wide = grow(small, enc_layers=1, dec_layers=1, ffn_mult=2, width=256)
    assert wide.config.width == 256 and wide.config.preprocess.width == 256
    src = small.state_dict()
    assert all(torch.equal(v, src[k]) for k, v in wide.state_dict().items())
    with torch.no_grad():
        assert wide.encoder(torch.rand(2, 1, 32, 256)).shape[1] == 2 * small.encoder(torch.rand(2, 1, 32, 128)).shape[1]
        wide.recognize(torch.zeros(1, 1, 32, 256))
    # Position interpolation: the wide grid's even columns carry the narrow grid's positions.
    assert wide.config.pos_step_w == 0.5 and wide.config.pos_step_h == 1.0
    assert torch.allclose(wide.encoder.pos.pe_w[::2], small.encoder.pos.pe_w, atol=1e-6)
    wider = grow(wide, enc_layers=1, dec_layers=1, ffn_mult=2, width=512)
    assert wider.config.pos_step_w == 0.25 and torch.allclose(wider.encoder.pos.pe_w[::4], small.encoder.pos.pe_w, atol=1e-6)
    with pytest.raises(ValueError, match="multiples of 4"):
        grow(small, enc_layers=1, dec_layers=1, ffn_mult=2, width=130)
    with pytest.raises(ValueError, match="only adds"):
        grow(small, enc_layers=1, dec_layers=1, ffn_mult=2, width=64)


def test_a_localisation_grid_predicts_the_same_points_and_saves(tmp_path) -> None:
    small = _trained_looking(SAFLConfig.from_preset("tiny"))
    big = grow(small, 1, 1, small.config.ffn_mult, loc_grid=(2, 8))
    assert (big.config.tps_loc_h, big.config.tps_loc_w) == (2, 8)
    images = torch.rand(4, 1, 32, 128) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(big.rectifier.points(images), small.rectifier.points(images), atol=1e-5, rtol=0)
    assert big.rectifier.loc_net[11].in_features == 16 * small.rectifier.loc_net[11].in_features
    info = save_checkpoint(big, tmp_path / "loc.safetensors", name="loc")
    assert load_checkpoint(tmp_path / "loc.safetensors")[1].config == info.config
    with pytest.raises(ValueError, match="1 x 1 localisation grid"):
        grow(big, 1, 1, big.config.ffn_mult, loc_grid=(2, 4))


# -- colour input --------------------------------------------------------------------------------

SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "safl.safetensors"


def _luma_of(rgb: torch.Tensor) -> torch.Tensor:
    """The grey input ``[B, 1, H, W]`` an RGB input ``[B, 3, H, W]`` holds, in floats."""
    return (rgb * torch.tensor(LUMA).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)


def test_a_colour_model_computes_the_grey_model_on_the_luma(tmp_path, capsys) -> None:
    grey = _trained_looking(SAFLConfig.from_preset("tiny"))
    rgb = grow(grey, 1, 1, grey.config.ffn_mult, channels=3)
    assert rgb.config.channels == 3 and rgb.config.preprocess.channels == 3
    assert rgb.encoder.stem.net[0].weight.shape[1] == rgb.rectifier.loc_net[0].weight.shape[1] == 3
    images = torch.rand(3, 3, 32, 128) * 2 - 1
    tokens = torch.randint(3, len(grey.charset.chars), (3, 7))
    with torch.no_grad():
        # The rectifier's points (its localisation net reads the input) and the logits.
        torch.testing.assert_close(rgb.rectifier.points(images), grey.rectifier.points(_luma_of(images)), atol=1e-5, rtol=0)
        torch.testing.assert_close(rgb(images, tokens), grey(_luma_of(images), tokens), atol=1e-5, rtol=0)
    # Every other weight is the grey model's.
    src = grey.state_dict()
    assert all(torch.equal(v, src[k]) for k, v in rgb.state_dict().items() if v.shape == src[k].shape)
    with pytest.raises(ValueError, match="grey model"):
        grow(rgb, 1, 1, rgb.config.ffn_mult, channels=1)
    # The command line, and a colour checkpoint that loads as one.
    src_path = save_checkpoint(grey, tmp_path / "grey.safetensors", name="safl-tiny").weights_path
    main([str(src_path), str(tmp_path / "rgb.safetensors"), "--channels", "3"])
    loaded, info = load_checkpoint(tmp_path / "rgb.safetensors")
    assert info.config.channels == 3 and info.training["grown_from"].startswith("safl-tiny@")
    assert "rgb.safetensors" in capsys.readouterr().out


@pytest.fixture(scope="module")
def colour_crops(any_faces) -> list[Image.Image]:
    """Rendered colour crops (a third of them weak-luma: text of the background's luma in
    another hue), at the model's size."""
    renderer = Renderer(SynthConfig(seed=11, channels=3), any_faces)
    return [Image.fromarray(renderer.render(i)[0]) for i in range(64)]


def test_the_grown_shipped_model_reads_colour_crops_as_it_read_them_in_grey(colour_crops: list[Image.Image]) -> None:
    grey, _ = load_checkpoint(SHIPPED)
    c = grey.config
    rgb = grow(grey, c.enc_layers, c.dec_layers, c.ffn_mult, channels=3)
    x_rgb = collate([preprocess(im, rgb.config.preprocess) for im in colour_crops])
    x_pillow = collate([preprocess(im, c.preprocess) for im in colour_crops])  # convert("L"): luma rounded to whole levels
    assert x_rgb.shape[1] == 3 and x_pillow.shape[1] == 1
    with torch.no_grad():
        read_rgb, read_float, read_pillow = rgb.recognize(x_rgb), grey.recognize(_luma_of(x_rgb)), grey.recognize(x_pillow)
        ids, _ = grey.generate(x_pillow)
        tokens = torch.cat([torch.full((ids.shape[0], 1), BOS_ID), ids[:, :-1]], dim=1)
        logits_rgb, logits_float, logits_pillow = rgb(x_rgb, tokens), grey(_luma_of(x_rgb), tokens), grey(x_pillow, tokens)
    # Exactly the grey reader on the luma it computes itself ...
    assert [r.text for r in read_rgb] == [r.text for r in read_float]
    torch.testing.assert_close(logits_rgb, logits_float, atol=1e-4, rtol=0)
    # ... and on Pillow's grey, which rounds that luma to whole levels (at most half a level
    # off): the same readings wherever the grey model is not unsure (on 200 such crops, the
    # 9 of 200 that differed were all read below 0.35, and half a level of noise on the grey
    # input alone changes 5 of 200 readings), and nearly the same logits.
    assert (_luma_of(x_rgb) - x_pillow).abs().max() * 127.5 <= 0.51
    sure = [i for i, r in enumerate(read_pillow) if r.confidence >= 0.5]
    assert len(sure) >= 16
    assert [read_rgb[i].text for i in sure] == [read_pillow[i].text for i in sure]
    assert max(abs(read_rgb[i].confidence - read_pillow[i].confidence) for i in sure) < 0.05
    until_end = torch.arange(tokens.shape[1])[None, :] <= torch.tensor([len(r.text) for r in read_pillow])[:, None]
    assert (logits_rgb - logits_pillow).abs().amax(dim=-1)[until_end].max() < 2.0


def test_a_localisation_grid_model_reads_the_same_on_onnx_runtime() -> None:
    from model.onnx_engine import OnnxEngine, export_graphs_checked

    big = grow(_trained_looking(SAFLConfig.from_preset("tiny")), 1, 1, 2, loc_grid=(2, 8))
    with torch.no_grad():
        big.rectifier.fc.weight.normal_(0, 0.05)  # a rectifier that warps
    images = torch.rand(3, 1, 32, 128) * 2 - 1
    onnx = OnnxEngine(big, export_graphs_checked(big, "loc-grid"), threads=1).recognize(images)
    torch_readings = big.recognize(images)
    assert [r.text for r in onnx] == [r.text for r in torch_readings]
    assert all(abs(a.confidence - b.confidence) < 1e-4 for a, b in zip(onnx, torch_readings))
