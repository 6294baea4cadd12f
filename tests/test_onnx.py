"""The ONNX export and the ONNX Runtime backend read exactly as the PyTorch model does."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import render_word

from model import SAFL, load_checkpoint
from model import greedy as greedy_rule
from model.charset import BOS_ID, EOS_ID
from model.decode import DecoderLayer
from model.engine import ENGINES, EngineUnavailable, choose_engine, open_engine
from model.lexicon import Lexicon
from model.onnx_engine import OnnxEngine, export_graphs_checked
from model.onnx_export import ENCODER_FILE, LAYOUT_FILE, STEP_FILE, export_onnx
from model.preprocess import collate, preprocess
from model.search import DecodeOptions
from model.torch_engine import TorchEngine

ort = pytest.importorskip("onnxruntime")


def _same(a: list, b: list) -> None:
    assert [r.text for r in a] == [r.text for r in b]
    for x, y in zip(a, b):
        assert x.confidence == pytest.approx(y.confidence, rel=1e-4, abs=1e-7)
        assert x.char_confidences == pytest.approx(y.char_confidences, rel=1e-4, abs=1e-7)


def test_onnx_reads_as_pytorch_learnt_words_noise_and_allowlists(memorised_checkpoint: tuple[Path, list[str]], tiny_model: SAFL) -> None:
    model, info = load_checkpoint(memorised_checkpoint[0])
    words = memorised_checkpoint[1]
    onnx = OnnxEngine(model, export_graphs_checked(model, info.model_id), threads=1)
    images = collate([preprocess(render_word(w), model.config.preprocess) for w in words])
    _same(onnx.recognize(images), model.recognize(images))
    assert [r.text for r in onnx.recognize(images)] == words
    noise = torch.rand(5, 1, 32, 128) * 2 - 1
    _same(onnx.recognize(noise), model.recognize(noise))
    _same(onnx.recognize(noise[:1]), model.recognize(noise[:1]))  # batch 1: the serving case
    digits = DecodeOptions(allowed=model.charset.token_mask("0123456789"))
    opts = [digits, DecodeOptions(), digits, digits, DecodeOptions()]
    _same(onnx.recognize(noise, options=opts), model.recognize(noise, options=opts))
    # Lexicons and top_k are read by the PyTorch model, in the same call.
    lex = DecodeOptions(lexicon=Lexicon.build(["cat", "house"], model.charset, model.config.max_len), top_k=2)
    mixed = onnx.recognize(images[:2], options=[lex, DecodeOptions()])
    assert mixed[0].text in ("cat", "house") and len(mixed[0].alternatives) == 2 and mixed[1].text == words[1]
    assert torch.equal(onnx.rectify(images), model.rectify(images))


def test_onnx_ends_a_reading_at_max_len_as_pytorch_does(tiny_model: SAFL) -> None:
    never_ends = copy.deepcopy(tiny_model)
    with torch.no_grad():
        never_ends.decoder.head.bias[EOS_ID] -= 1e4
    x = torch.rand(2, 1, 32, 128)
    onnx = OnnxEngine(never_ends, export_graphs_checked(never_ends, "never-ends"), threads=1).recognize(x)
    torch_reading = TorchEngine(never_ends).recognize(x)
    _same(onnx, torch_reading)
    assert all(len(r.text) == never_ends.config.max_len and r.confidence < 1e-3 for r in onnx)


def test_export_writes_graphs_a_plain_onnx_runtime_can_run(tiny_model: SAFL, tmp_path: Path) -> None:
    paths = export_onnx(tiny_model, "safl-tiny@0", tmp_path / "onnx")
    assert [p.name for p in paths] == [ENCODER_FILE, STEP_FILE, LAYOUT_FILE]
    layout = json.loads((tmp_path / "onnx" / LAYOUT_FILE).read_text())
    assert layout["model_id"] == "safl-tiny@0" and layout["config"]["preset"] == "tiny"
    # Driven by hand from the layout alone: the first step's logits match the PyTorch decoder's.
    x = torch.rand(3, 1, 32, 128)
    enc = ort.InferenceSession(str(paths[0]), providers=["CPUExecutionProvider"])
    step = ort.InferenceSession(str(paths[1]), providers=["CPUExecutionProvider"])
    memory = enc.run(layout["memory_names"], {"images": x.numpy()})
    feed = dict(zip(layout["memory_names"], memory))
    feed |= {n: np.zeros((3, layout["heads"], 0, layout["head_dim"]), np.float32) for n in layout["cache_names"]}
    feed |= {"token": np.full((3, 1), BOS_ID, np.int64), "position": np.array([0], np.int64)}
    logits = step.run(["logits"], feed)[0]
    with torch.no_grad():
        tokens = torch.full((3, 1), BOS_ID, dtype=torch.long)
        expected = tiny_model.decoder(tokens, tiny_model.encode(x))[:, -1]
    assert logits.shape == (3, layout["vocab_size"])
    np.testing.assert_allclose(logits, expected.numpy(), rtol=1e-4, atol=1e-4)


def test_without_onnx_auto_falls_back_to_pytorch_and_onnx_refuses_to_start(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from service.predictor import Predictor, StartupError

    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    empty = tmp_path / "cache"  # no graphs exported yet: the export needs onnx
    predictor = Predictor.load(tiny_checkpoint, "cpu", threads=1, cache_dir=empty)
    assert predictor.backend == "torch" and isinstance(predictor.model, TorchEngine)
    with pytest.raises(StartupError, match="--backend onnx needs onnxruntime and onnx"):
        Predictor.load(tiny_checkpoint, "cpu", threads=1, backend="onnx", cache_dir=empty)
    assert Predictor.load(tiny_checkpoint, "cpu", threads=1, backend="torch", cache_dir=empty).backend == "torch"
    monkeypatch.delitem(sys.modules, "onnx")
    Predictor.load(tiny_checkpoint, "cpu", threads=1, cache_dir=empty)  # exports and keeps the graphs
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert Predictor.load(tiny_checkpoint, "cpu", threads=1, cache_dir=empty).backend == "onnx"  # cached graphs need only onnxruntime


def test_a_change_to_the_decoder_step_reaches_both_engines(memorised_checkpoint: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The exported step graph is traced from ``DecoderLayer.forward`` itself, not a copy of
    it: a changed layer reads the same changed text on both engines (here: each layer's output
    reversed along the model dimension, which makes the memorised words unreadable)."""
    model, info = load_checkpoint(memorised_checkpoint[0])
    images = collate([preprocess(render_word(w), model.config.preprocess) for w in memorised_checkpoint[1]])
    real = DecoderLayer.forward

    def reversed_layer(self, x, memory_kv, past=None, causal=False):  # noqa: ANN001, ANN202
        out, kv = real(self, x, memory_kv, past, causal)
        return out.flip(-1), kv

    monkeypatch.setattr(DecoderLayer, "forward", reversed_layer)
    changed = TorchEngine(model).recognize(images)
    assert [r.text for r in changed] != memorised_checkpoint[1]
    _same(OnnxEngine(model, export_graphs_checked(model, info.model_id), threads=1).recognize(images), changed)


def test_the_greedy_rule_is_the_one_both_loops_and_beam_search_follow(memorised_checkpoint: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Tokens added to ``model.greedy.NEVER_EMITTED`` vanish from the readings of the PyTorch
    loop, the NumPy loop and beam search alike, and the two loops still agree."""
    model, info = load_checkpoint(memorised_checkpoint[0])
    words = memorised_checkpoint[1]
    images = collate([preprocess(render_word(w), model.config.preprocess) for w in words])
    onnx = OnnxEngine(model, export_graphs_checked(model, info.model_id), threads=1)
    banned = sorted({c for w in words for c in w})[:3]
    monkeypatch.setattr(greedy_rule, "NEVER_EMITTED", [*greedy_rule.NEVER_EMITTED, *model.charset.encode(banned)])
    plain, beam = TorchEngine(model).recognize(images), onnx.recognize(images, options=DecodeOptions(top_k=2))
    _same(onnx.recognize(images), plain)
    assert all(not set(banned) & set(r.text) for r in [*plain, *beam])
    assert any(set(banned) & set(w) for w in words)


def test_the_engine_choice(tiny_model: SAFL, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    assert [choose_engine(name, "cpu") for name in ENGINES] == ["onnx", "onnx", "torch"]
    assert [choose_engine(name, "cuda") for name in ("auto", "torch")] == ["torch", "torch"]
    with pytest.raises(EngineUnavailable, match="runs on the CPU, not cuda"):
        choose_engine("onnx", "cuda")
    with pytest.raises(EngineUnavailable, match="unknown backend 'tensorrt'"):
        choose_engine("tensorrt", "cpu")
    assert isinstance(open_engine(tiny_model, "tiny", "auto", "cpu", 1), OnnxEngine)
    assert isinstance(open_engine(tiny_model, "tiny", "auto", "cuda", 1), TorchEngine)

    def broken() -> tuple:
        raise RuntimeError("graphs the runtime refuses")

    with caplog.at_level("WARNING", logger="model.engine"):
        assert open_engine(tiny_model, "tiny", "auto", "cpu", 1, broken).name == "torch"
    assert [r.getMessage() for r in caplog.records] == ["cannot run the model on ONNX Runtime (RuntimeError: graphs the runtime refuses); reading with PyTorch"]
    with pytest.raises(EngineUnavailable, match="cannot run tiny on ONNX Runtime .*; use --backend torch"):
        open_engine(tiny_model, "tiny", "onnx", "cpu", 1, broken)
