"""model.training.average: a uniform weight average of real checkpoints, and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import SAFL, SAFLConfig
from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.training.average import average_checkpoints, main


def _perturbed(tiny_model: SAFL, seed: int) -> SAFL:
    model = SAFL(tiny_model.config)
    model.load_state_dict(tiny_model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def test_the_average_is_the_mean_of_every_float_tensor(tiny_model: SAFL, tmp_path: Path) -> None:
    a, b, c = (_perturbed(tiny_model, s) for s in (1, 2, 3))
    paths = [save_checkpoint(m, tmp_path / f"{n}.safetensors", name="safl-tiny").weights_path for n, m in zip("abc", (a, b, c))]
    info = average_checkpoints(paths, tmp_path / "soup.safetensors")
    soup, loaded = load_checkpoint(info.weights_path)
    assert loaded.name == "safl-tiny"  # the inputs' name, so a shipped average keeps safl-<preset>
    assert loaded.training["averaged"] == [load_checkpoint(p)[1].model_id for p in paths]
    states = [m.state_dict() for m in (a, b, c)]
    for k, v in soup.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, sum(s[k] for s in states) / 3, atol=1e-6), k
        else:
            assert torch.equal(v, states[0][k]), k
    # It reads: the averaged network runs end to end.
    soup.recognize(torch.zeros(1, 1, soup.config.height, soup.config.width))


def test_mismatched_or_too_few_checkpoints_are_refused(tiny_model: SAFL, tmp_path: Path, capsys) -> None:
    tiny = save_checkpoint(tiny_model, tmp_path / "tiny.safetensors").weights_path
    other = save_checkpoint(SAFL(SAFLConfig.from_preset("tiny", d_model=32)), tmp_path / "other.safetensors").weights_path
    with pytest.raises(CheckpointError, match="another model config"):
        average_checkpoints([tiny, other], tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="at least two"):
        average_checkpoints([tiny], tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="twice"):
        average_checkpoints([tiny, tmp_path / "." / "tiny.safetensors"], tmp_path / "x.safetensors")
    twin = save_checkpoint(tiny_model, tmp_path / "twin.safetensors").weights_path
    before = twin.read_bytes()
    with pytest.raises(CheckpointError, match="one of the inputs"):
        average_checkpoints([tiny, twin], twin)
    assert twin.read_bytes() == before  # left as it was
    assert main([str(tmp_path / "y.safetensors"), str(tiny), str(tmp_path / "missing.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "y.safetensors").exists()


def test_nested_charsets_average_each_row_over_the_inputs_that_have_its_token(tiny_model: SAFL, tmp_path: Path) -> None:
    from model.training.train import with_charset

    narrow = _perturbed(tiny_model, 1)
    wide = _perturbed(with_charset(tiny_model, " " + tiny_model.config.charset), 2)  # a space learnt on top
    paths = [save_checkpoint(m, tmp_path / f"{n}.safetensors", name="safl-tiny").weights_path for n, m in (("narrow", narrow), ("wide", wide))]
    soup, info = load_checkpoint(average_checkpoints(paths, tmp_path / "soup.safetensors").weights_path)
    assert info.config.charset == wide.config.charset  # the widest charset is read
    sn, sw, ss = narrow.state_dict(), wide.state_dict(), soup.state_dict()
    space, a = wide.charset.encode(" ")[0], wide.charset.encode("a")[0]
    a_narrow = narrow.charset.encode("a")[0]
    for k in ("decoder.embed.weight", "decoder.head.weight", "decoder.head.bias"):
        assert torch.equal(ss[k][space], sw[k][space]), k  # the new token's row: the one input that learnt it
        assert torch.allclose(ss[k][a], (sw[k][a] + sn[k][a_narrow]) / 2, atol=1e-6), k  # a shared one: the mean
        assert torch.allclose(ss[k][:3], (sw[k][:3] + sn[k][:3]) / 2, atol=1e-6), k  # the special tokens too
    assert torch.allclose(ss["decoder.norm.weight"], (sw["decoder.norm.weight"] + sn["decoder.norm.weight"]) / 2, atol=1e-6)
    soup.recognize(torch.zeros(1, 1, soup.config.height, soup.config.width))


def test_charsets_that_do_not_nest_are_refused(tiny_model: SAFL, tmp_path: Path) -> None:
    from model.training.train import with_charset

    cs = tiny_model.config.charset
    a = save_checkpoint(with_charset(tiny_model, cs + " "), tmp_path / "a.safetensors").weights_path
    b = save_checkpoint(with_charset(tiny_model, cs + "é"), tmp_path / "b.safetensors").weights_path
    with pytest.raises(CheckpointError, match="do not nest"):
        average_checkpoints([a, b], tmp_path / "x.safetensors")


def test_mix_weighs_the_inputs_and_a_token_row_over_those_that_have_it(tiny_model: SAFL, tmp_path: Path, capsys) -> None:
    from model.training.train import with_charset

    narrow = _perturbed(tiny_model, 1)
    wide = _perturbed(with_charset(tiny_model, " " + tiny_model.config.charset), 2)
    paths = [save_checkpoint(m, tmp_path / f"{n}.safetensors", name="safl-tiny").weights_path for n, m in (("narrow", narrow), ("wide", wide))]
    assert main([str(tmp_path / "wise.safetensors"), *map(str, paths), "--mix", "1", "3"]) == 0  # scaled: 0.25 / 0.75
    assert "the mix 1 3 of 2 checkpoints" in capsys.readouterr().out
    soup, info = load_checkpoint(tmp_path / "wise.safetensors")
    assert info.training["mix"] == [0.25, 0.75]
    sn, sw, ss = narrow.state_dict(), wide.state_dict(), soup.state_dict()
    space, a, a_narrow = wide.charset.encode(" ")[0], wide.charset.encode("a")[0], narrow.charset.encode("a")[0]
    k = "decoder.norm.weight"
    assert torch.allclose(ss[k], 0.25 * sn[k] + 0.75 * sw[k], atol=1e-6)
    for k in ("decoder.embed.weight", "decoder.head.bias"):
        assert torch.equal(ss[k][space], sw[k][space]), k  # only one input has it: its weight becomes 1
        assert torch.allclose(ss[k][a], 0.25 * sn[k][a_narrow] + 0.75 * sw[k][a], atol=1e-6), k
    for bad in (["--mix", "1"], ["--mix", "1", "0"], ["--mix", "1", "-1"], ["--mix", "inf", "1"]):
        assert main([str(tmp_path / "bad.safetensors"), *map(str, paths), *bad]) == 2
        assert "one positive, finite weight per checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "bad.safetensors").exists()
