"""Checkpoint I/O: exact round trip, and a clear error for every way a checkpoint can be broken."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import render_word

from model import SAFL, CheckpointError, SAFLConfig, load_checkpoint, save_checkpoint
from model.checkpoint import FORMAT_VERSION, file_sha256, read_info
from model.preprocess import collate, preprocess


@pytest.fixture
def ckpt(tmp_path: Path, tiny_checkpoint: Path) -> Path:
    """A private copy of the session's tiny checkpoint that a test may break."""
    dst = tmp_path / "m.safetensors"
    shutil.copyfile(tiny_checkpoint, dst)
    shutil.copyfile(tiny_checkpoint.with_suffix(".json"), dst.with_suffix(".json"))
    return dst


def _sidecar(path: Path) -> dict:
    return json.loads(path.with_suffix(".json").read_text())


def _write_sidecar(path: Path, meta: dict) -> None:
    path.with_suffix(".json").write_text(json.dumps(meta))


def _batch(model: SAFL) -> torch.Tensor:
    return collate([preprocess(render_word(w), model.config.preprocess) for w in ("Hello", "exit", "42")])


# -- round trip ---------------------------------------------------------------------------------


def test_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = SAFL(SAFLConfig.from_preset("tiny", max_len=10)).eval()
    with torch.no_grad():  # make every parameter and buffer non-default (BatchNorm statistics too)
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.01)
    info = save_checkpoint(model, tmp_path / "out" / "m.safetensors", name="unit", training={"step": 7, "loss": "focal"})
    loaded, info2 = load_checkpoint(tmp_path / "out" / "m.safetensors")
    assert not loaded.training
    assert loaded.config == model.config
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    x = _batch(model)
    tokens = torch.randint(3, model.charset.vocab_size, (3, 6))
    with torch.no_grad():
        assert torch.equal(model(x, tokens), loaded(x, tokens))
    assert model.recognize(x) == loaded.recognize(x)
    assert info2.sha256 == info.sha256 == file_sha256(tmp_path / "out" / "m.safetensors")
    assert info2.name == "unit" and info2.model_id == f"unit@{info.sha256[:12]}"
    assert info2.training == {"step": 7, "loss": "focal"}
    assert info2.config.max_len == 10


def test_sidecar_contents(tiny_checkpoint: Path, tiny_model: SAFL) -> None:
    meta = _sidecar(tiny_checkpoint)
    assert meta["format"] == "safl-checkpoint" and meta["format_version"] == FORMAT_VERSION
    assert meta["config"] == tiny_model.config.to_dict()
    assert meta["charset"] == tiny_model.config.charset
    assert meta["preprocess"] == {"height": 32, "width": 128, "channels": 1}
    assert meta["sha256"] == file_sha256(tiny_checkpoint)


def test_the_same_model_always_saves_to_the_same_bytes(tmp_path: Path, tiny_model: SAFL) -> None:
    # The model id is the weights' sha256: saving one model again (``ship``, an average of the
    # same inputs) must give the same id. safetensors writes its metadata map in hash order,
    # which made half of all re-saves differ while the header had two keys.
    ids = {save_checkpoint(tiny_model, tmp_path / f"m{i}.safetensors", name="x").sha256 for i in range(8)}
    assert len(ids) == 1


def test_load_by_stem_json_or_folder(ckpt: Path, tiny_model: SAFL) -> None:
    x = _batch(tiny_model)
    want = tiny_model.recognize(x)
    for p in (ckpt, ckpt.with_suffix(".json"), ckpt.with_suffix(""), ckpt.parent, str(ckpt)):
        model, info = load_checkpoint(p)
        assert info.weights_path == ckpt
        assert model.recognize(x) == want


def test_save_leaves_no_temporary_files(tmp_path: Path, tiny_model: SAFL) -> None:
    save_checkpoint(tiny_model, tmp_path / "a")  # the suffix is added
    save_checkpoint(tiny_model, tmp_path / "a.safetensors")  # and overwriting is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.safetensors"]


def test_read_info_without_verification(ckpt: Path) -> None:
    info = read_info(ckpt, verify=False)
    assert info.sha256 == _sidecar(ckpt)["sha256"]


# -- broken checkpoints -------------------------------------------------------------------------


def test_missing_weights(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="weights not found"):
        load_checkpoint(tmp_path / "nothing.safetensors")


def test_missing_sidecar(ckpt: Path) -> None:
    ckpt.with_suffix(".json").unlink()
    with pytest.raises(CheckpointError, match=r"sidecar not found: .*m\.json"):
        load_checkpoint(ckpt)


def test_truncated_weights_caught_by_hash(ckpt: Path) -> None:
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt, truncated or not the one its sidecar describes"):
        load_checkpoint(ckpt)


def test_truncated_weights_without_hash(ckpt: Path) -> None:
    meta = _sidecar(ckpt)
    del meta["sha256"]
    _write_sidecar(ckpt, meta)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="could not read weights"):
        load_checkpoint(ckpt)


def test_swapped_weights(ckpt: Path, tmp_path: Path) -> None:
    torch.manual_seed(1)
    save_checkpoint(SAFL(SAFLConfig.from_preset("tiny")), tmp_path / "other.safetensors")
    shutil.copyfile(tmp_path / "other.safetensors", ckpt)
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("text", ["{not json", "", "\xff\xfe"])
def test_sidecar_not_json(ckpt: Path, text: str) -> None:
    ckpt.with_suffix(".json").write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("meta", [[1, 2], {"format": "pytorch"}, {}])
def test_sidecar_wrong_json(ckpt: Path, meta) -> None:
    ckpt.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a safl checkpoint sidecar"):
        load_checkpoint(ckpt)


def test_future_format_version(ckpt: Path) -> None:
    meta = _sidecar(ckpt)
    meta["format_version"] = FORMAT_VERSION + 1
    _write_sidecar(ckpt, meta)
    with pytest.raises(CheckpointError, match="format_version"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("config", [None, "tiny", {"preset": "tiny", "depth": 5}])
def test_invalid_config(ckpt: Path, config) -> None:
    meta = _sidecar(ckpt)
    if config is None:
        del meta["config"]
    else:
        meta["config"] = config
    _write_sidecar(ckpt, meta)
    with pytest.raises(CheckpointError, match="invalid model config"):
        load_checkpoint(ckpt)


def test_charset_mismatch_between_sidecar_and_config(ckpt: Path) -> None:
    meta = _sidecar(ckpt)
    meta["charset"] = meta["charset"][::-1]
    _write_sidecar(ckpt, meta)
    with pytest.raises(CheckpointError, match="charset field does not match"):
        load_checkpoint(ckpt)


def test_config_charset_does_not_fit_the_tensors(ckpt: Path) -> None:
    # A consistent sidecar whose charset is shorter than the one the weights were trained with.
    meta = _sidecar(ckpt)
    meta["config"]["charset"] = meta["charset"] = "0123456789"
    _write_sidecar(ckpt, meta)
    with pytest.raises(CheckpointError, match=r"has shape \(97, 64\).*charset of 10 chars.*expects \(13, 64\)"):
        load_checkpoint(ckpt)


def test_config_width_does_not_fit_the_tensors(ckpt: Path) -> None:
    meta = _sidecar(ckpt)
    meta["config"]["d_model"] = 32
    _write_sidecar(ckpt, meta)
    with pytest.raises(CheckpointError, match=r"tensor '.*' has shape .*d_model 32"):
        load_checkpoint(ckpt)


def test_config_depth_does_not_fit_the_tensors(ckpt: Path) -> None:
    meta = _sidecar(ckpt)
    meta["config"]["enc_layers"] = 2
    _write_sidecar(ckpt, meta)
    with pytest.raises(CheckpointError, match=r"do not fit the config: missing \['encoder\.layers\.1\."):
        load_checkpoint(ckpt)
    meta["config"]["enc_layers"] = 1
    meta["config"]["use_tps"] = False
    _write_sidecar(ckpt, meta)
    with pytest.raises(CheckpointError, match=r"unexpected \['rectifier\."):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("change,match", [({"heads": 3}, "not divisible"), ({"charset": "aab"}, "duplicate"), ({"channels": 2}, "channels")])
def test_config_that_cannot_be_built(ckpt: Path, change: dict, match: str) -> None:
    meta = _sidecar(ckpt)
    meta["config"].update(change)
    meta["charset"] = meta["config"]["charset"]
    _write_sidecar(ckpt, meta)
    with pytest.raises(CheckpointError, match=f"does not describe a buildable model: .*{match}"):
        load_checkpoint(ckpt)


def test_folder_with_several_checkpoints(ckpt: Path) -> None:
    shutil.copyfile(ckpt, ckpt.with_name("n.safetensors"))
    with pytest.raises(CheckpointError, match="holds 2 .safetensors files"):
        load_checkpoint(ckpt.parent)


def test_checkpoint_error_is_a_value_error() -> None:
    assert issubclass(CheckpointError, ValueError)


def test_format_1_checkpoint_loads_with_unbounded_tps(tmp_path: Path) -> None:
    """A checkpoint written before bounded TPS offsets (format 1) loads in legacy mode, same outputs."""
    from dataclasses import replace

    torch.manual_seed(0)
    legacy = SAFL(replace(SAFLConfig.from_preset("tiny"), tps_max_offset=0.0, tps_monotone=False)).eval()
    path = tmp_path / "old.safetensors"
    save_checkpoint(legacy, path)
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["format_version"] = 1
    del meta["config"]["tps_max_offset"], meta["config"]["tps_monotone"]
    path.with_suffix(".json").write_text(json.dumps(meta))
    loaded, info = load_checkpoint(path)
    assert info.config.tps_max_offset == 0.0 and not info.config.tps_monotone
    x = torch.randn(2, 1, 32, 128)
    torch.testing.assert_close(loaded.encode(x), legacy.encode(x))


def test_format_2_checkpoint_loads_with_foldable_tps_points(tmp_path: Path) -> None:
    """Format 2 (the shipped safl-small@a659eaef27c4) predates monotone TPS points: it loads
    with its bounded-offset head, both from the sidecar and from the config in the weights."""
    from dataclasses import replace

    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    old = SAFL(replace(SAFLConfig.from_preset("tiny"), tps_monotone=False)).eval()
    path = tmp_path / "v2.safetensors"
    save_checkpoint(old, path)
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["format_version"] = 2
    del meta["config"]["tps_monotone"]
    config = dict(meta["config"])
    save_file(load_file(str(path)), str(path), metadata={"format": "safl-checkpoint", "config": json.dumps(config, sort_keys=True)})
    meta["sha256"] = file_sha256(path)
    path.with_suffix(".json").write_text(json.dumps(meta))
    loaded, info = load_checkpoint(path)
    assert not info.config.tps_monotone and loaded.rectifier.fc.out_features == 40
    x = torch.randn(2, 1, 32, 128)
    torch.testing.assert_close(loaded.encode(x), old.encode(x))
