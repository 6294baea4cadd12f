"""Growing a model keeps what it computes (model.training.grow)."""

from __future__ import annotations

import pytest
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.safl import SAFL, SAFLConfig
from model.training.grow import grow, main


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
