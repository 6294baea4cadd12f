"""The SAFL network: shapes per preset, the TPS stage, the loss, greedy decoding, learning."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import render_word
from model_support import WORDS, Memorised, memorise
from PIL import Image

from model import PRESETS, SAFL, SAFLConfig
from model.charset import EOS_ID, PAD_ID
from model.loss import focal_loss, sequence_loss
from model.preprocess import ViewConfig, collate, preprocess
from model.rectify import TPSRectifier, fiducial_points
from model.search import DecodeOptions


@pytest.fixture(scope="module")
def memorised() -> Memorised:
    """The tiny preset trained on six rendered words until it reads them (a few seconds)."""
    return memorise()


@pytest.fixture(scope="module")
def memorised_without_tps() -> Memorised:
    """``memorised`` without a rectifier, for the tests of reading a crop in several views: a
    toy model's rectifier, fit to six crops, reads any unseen crop as one of them with ~0.6
    confidence, where a real model reads a sideways crop unsure."""
    return memorise(use_tps=False)


@pytest.fixture(scope="module")
def never_ends(tiny_model: SAFL) -> SAFL:
    """``tiny_model`` with the EOS logit pushed down: greedy decoding runs to ``max_len``."""
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        model.decoder.head.bias[EOS_ID] -= 1e4
    return model.eval()


def _words_batch(model: SAFL, words: list[str]) -> torch.Tensor:
    return collate([preprocess(render_word(w), model.config.preprocess) for w in words])


# -- shapes ---------------------------------------------------------------------------------


def _check_shapes(cfg: SAFLConfig, batch: int) -> None:
    torch.manual_seed(0)
    model = SAFL(cfg).eval()
    x = torch.rand(batch, cfg.channels, cfg.height, cfg.width) * 2 - 1
    tokens = torch.randint(3, model.charset.vocab_size, (batch, 7))
    with torch.no_grad():
        memory = model.encode(x)
        logits = model(x, tokens)
    grid_w = cfg.width // 4
    assert memory.shape == (batch, cfg.grid_h * grid_w, cfg.d_model)
    assert logits.shape == (batch, 7, len(cfg.charset) + 3)
    assert torch.isfinite(logits).all()
    if model.rectifier is not None:
        assert model.rectifier(x).shape == x.shape


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_output_shapes(preset: str) -> None:
    cfg = SAFLConfig.from_preset(preset)
    _check_shapes(cfg, batch=3)
    model = SAFL(cfg).eval()
    ids, probs = model.generate(torch.zeros(2, cfg.channels, cfg.height, cfg.width))
    assert ids.shape == probs.shape and ids.shape[0] == 2 and 1 <= ids.shape[1] <= cfg.max_len + 1
    assert ((probs > 0) & (probs <= 1)).all()


def test_output_shapes_base() -> None:
    """The paper-sized preset (43 M parameters): one forward at batch 1."""
    cfg = SAFLConfig.from_preset("base")
    assert cfg.locality_ffn and cfg.grid_h == 8
    _check_shapes(cfg, batch=1)


def test_output_shapes_variants() -> None:
    # RGB input, no TPS, another geometry and charset.
    _check_shapes(SAFLConfig.from_preset("tiny", channels=3, use_tps=False, height=48, width=160, grid_h=2, charset="abc"), batch=2)
    _check_shapes(SAFLConfig.from_preset("tiny", locality_ffn=True, tps_points=10), batch=2)
    assert SAFL(SAFLConfig.from_preset("tiny", use_tps=False)).rectifier is None


def test_preset_sizes_grow() -> None:
    sizes = {name: SAFL(cfg).num_parameters() for name, cfg in PRESETS.items() if name != "base"}
    assert sizes["tiny"] < 500_000 < sizes["small"] < 5_000_000


@pytest.mark.parametrize(
    "overrides,match", [({"heads": 3}, "not divisible"), ({"grid_h": 3}, "grid_h"), ({"height": 30}, "multiples of 4"), ({"channels": 2}, "channels")]
)
def test_invalid_configs_rejected(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SAFL(SAFLConfig.from_preset("tiny", **overrides))


def test_config_dict_round_trip() -> None:
    cfg = SAFLConfig.from_preset("tiny", max_len=12)
    assert SAFLConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown SAFLConfig keys"):
        SAFLConfig.from_dict({**cfg.to_dict(), "depth": 3})
    with pytest.raises(ValueError, match="unknown preset"):
        SAFLConfig.from_preset("huge")
    assert cfg.preprocess.height == 32 and cfg.preprocess.width == 128


# -- TPS ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels,height,width,points", [(1, 32, 128, 20), (3, 48, 160, 10), (1, 32, 100, 4)])
def test_tps_is_identity_at_initialisation(channels: int, height: int, width: int, points: int) -> None:
    torch.manual_seed(0)
    tps = TPSRectifier(channels, height, width, points).eval()
    x = torch.rand(2, channels, height, width) * 2 - 1
    with torch.no_grad():
        y = tps(x)
    torch.testing.assert_close(y, x, atol=1e-3, rtol=0)


def test_tps_of_the_model_returns_the_rendered_word(tiny_model: SAFL) -> None:
    x = _words_batch(tiny_model, ["Hello", "world"])
    with torch.no_grad():
        torch.testing.assert_close(tiny_model.rectifier(x), x, atol=1e-3, rtol=0)


def test_fiducial_points() -> None:
    pts = fiducial_points(20)
    assert pts.shape == (20, 2)
    assert pts[:10, 1].eq(-1).all() and pts[10:, 1].eq(1).all()
    for bad in (3, 5):
        with pytest.raises(ValueError):
            fiducial_points(bad)


def test_gradients_reach_the_localisation_net() -> None:
    torch.manual_seed(0)
    model = SAFL(SAFLConfig.from_preset("tiny")).train()
    words = ["cat", "house", "TREE", "Moon"]
    x = _words_batch(model, words)
    inp, tgt = model.charset.encode_batch(words)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def backward() -> None:
        opt.zero_grad()
        focal_loss(model(x, inp), tgt).backward()

    backward()
    fc = model.rectifier.fc
    assert fc.weight.grad is not None and fc.weight.grad.abs().sum() > 0
    assert fc.bias.grad is not None and fc.bias.grad.abs().sum() > 0
    # The last layer starts at zero weight (identity TPS), so the CNN below it learns from step 2 on.
    opt.step()
    backward()
    loc_grads = [p.grad for p in model.rectifier.loc_net.parameters()]
    assert all(g is not None for g in loc_grads)
    assert sum(float(g.abs().sum()) for g in loc_grads) > 0
    first_conv = model.rectifier.loc_net[0].weight.grad
    assert first_conv.abs().sum() > 0


# -- loss ---------------------------------------------------------------------------------------


def _logits_targets(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 9, 97, generator=g) * 3
    targets = torch.randint(3, 97, (4, 9), generator=g)
    targets[0, 5:] = PAD_ID
    targets[2, 2:] = PAD_ID
    targets[3, 0] = EOS_ID
    return logits, targets


def test_focal_gamma_zero_is_cross_entropy() -> None:
    logits, targets = _logits_targets()
    ce = F.cross_entropy(logits.reshape(-1, 97), targets.reshape(-1), ignore_index=PAD_ID)
    torch.testing.assert_close(focal_loss(logits, targets, gamma=0.0), ce)
    torch.testing.assert_close(sequence_loss(logits, targets, "ce"), ce)
    # Gradients too.
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    focal_loss(a, targets, gamma=0.0).backward()
    F.cross_entropy(b.reshape(-1, 97), targets.reshape(-1), ignore_index=PAD_ID).backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_padding_does_not_count() -> None:
    logits, targets = _logits_targets()
    changed = logits.clone()
    changed[targets == PAD_ID] = torch.randn_like(changed[targets == PAD_ID]) * 100
    for gamma in (0.0, 2.0):
        torch.testing.assert_close(focal_loss(changed, targets, gamma), focal_loss(logits, targets, gamma))


def test_focal_down_weights_confident_tokens() -> None:
    # Token 0 predicted with p ~ 0.95, token 1 with p ~ 0.2.
    logits = torch.full((1, 2, 10), 0.0)
    logits[0, 0, 3] = 5.0
    logits[0, 1, 3] = 1.0
    targets = torch.tensor([[3, 3]])
    p = logits.softmax(-1)[0, :, 3]
    assert p[0] > 0.9 and p[1] < 0.3

    def per_token(gamma: float) -> torch.Tensor:
        return torch.stack([focal_loss(logits[:, i : i + 1], targets[:, i : i + 1], gamma) for i in range(2)])

    ce, fl = per_token(0.0), per_token(2.0)
    ratio = fl / ce
    torch.testing.assert_close(ratio, (1 - p) ** 2)
    assert ratio[0] < 0.01 and ratio[1] > 0.5
    # Whole sequence: focal <= CE, and the confident token's share of the loss shrinks.
    assert focal_loss(logits, targets, 2.0) < focal_loss(logits, targets, 0.0)
    assert fl[0] / fl.sum() < ce[0] / ce.sum()


def test_loss_argument_checks() -> None:
    logits, targets = _logits_targets()
    with pytest.raises(ValueError, match="gamma"):
        focal_loss(logits, targets, gamma=-1.0)
    with pytest.raises(ValueError, match="unknown loss"):
        sequence_loss(logits, targets, "mse")
    torch.testing.assert_close(sequence_loss(logits, targets, "focal", 2.0), focal_loss(logits, targets, 2.0))


# -- greedy decoding ----------------------------------------------------------------------------


def test_kv_cache_matches_full_recompute_on_a_trained_model(memorised: Memorised) -> None:
    model, x = memorised.model, memorised.images
    ids_c, p_c = model.generate(x, use_cache=True)
    ids_n, p_n = model.generate(x, use_cache=False)
    assert torch.equal(ids_c, ids_n)
    torch.testing.assert_close(p_c, p_n, atol=1e-5, rtol=1e-4)
    assert [model.charset.decode(r) for r in ids_c.tolist()] == memorised.words


def test_kv_cache_matches_full_recompute_to_max_len(never_ends: SAFL) -> None:
    x = _words_batch(never_ends, ["Hello", "a", "Parking123"])
    ids_c, p_c = never_ends.generate(x, use_cache=True)
    ids_n, p_n = never_ends.generate(x, use_cache=False)
    max_len = never_ends.config.max_len
    assert ids_c.shape == (3, max_len + 1)
    assert (ids_c[:, -1] == EOS_ID).all() and (ids_c[:, :-1] != EOS_ID).all()  # forced end at max_len
    assert torch.equal(ids_c, ids_n)
    torch.testing.assert_close(p_c, p_n, atol=1e-5, rtol=1e-4)
    recs = never_ends.recognize(x)
    assert all(len(r.text) == max_len for r in recs)
    # The forced end keeps the model's (here ~0) probability of ending: the reading is unsure.
    assert (p_c[:, -1] < 1e-3).all()
    assert all(r.confidence < 1e-3 for r in recs)


def test_greedy_max_len_argument(never_ends: SAFL) -> None:
    x = _words_batch(never_ends, ["Hello"])
    ids, _ = never_ends.decoder.greedy(never_ends.encode(x), max_len=5)
    assert ids.shape == (1, 6) and int(ids[0, -1]) == EOS_ID


def test_finished_rows_are_padded(memorised: Memorised) -> None:
    ids, probs = memorised.model.generate(memorised.images)
    for row, p, word in zip(ids.tolist(), probs.tolist(), memorised.words):
        n = len(word)
        assert row[n] == EOS_ID
        assert all(i == PAD_ID for i in row[n + 1 :])
        assert all(q == 1.0 for q in p[n + 1 :])


def test_batched_recognition_equals_one_by_one(memorised: Memorised, never_ends: SAFL) -> None:
    for model, x in ((memorised.model, memorised.images), (never_ends, _words_batch(never_ends, ["Hello", "a", "Parking"]))):
        batched = model.recognize(x)
        single = [model.recognize(x[i : i + 1])[0] for i in range(x.shape[0])]
        assert [r.text for r in batched] == [r.text for r in single]
        for b, s in zip(batched, single):
            assert b.confidence == pytest.approx(s.confidence, rel=1e-4, abs=1e-6)
            assert b.char_confidences == pytest.approx(s.char_confidences, rel=1e-4, abs=1e-6)


def test_recognize_images_uses_the_shared_preprocessing(memorised: Memorised) -> None:
    model = memorised.model
    pil = [render_word(w, mode="RGB") for w in memorised.words]  # another mode: same pixels after preprocessing
    texts = [r.text for r in model.recognize_images(pil)]
    assert texts == memorised.words


def test_a_word_written_bottom_to_top_is_read_turned(memorised_without_tps: Memorised) -> None:
    memorised = memorised_without_tps  # see the fixture
    model = memorised.model
    tall = [render_word(w).transpose(Image.Transpose.ROTATE_90) for w in memorised.words]
    # Read as it stands, the sideways crop is not the word: the turn is what reads it.
    assert [r.text for r in model.recognize_images(tall, ViewConfig(turn_tall=False))] != memorised.words
    readings = model.recognize_images(tall)
    assert [r.text for r in readings] == memorised.words
    upright = model.recognize_images([render_word(w) for w in memorised.words])
    assert [r.confidence for r in readings] == pytest.approx([r.confidence for r in upright], rel=1e-4)


def test_confidence_is_the_probability_of_the_whole_string(memorised: Memorised) -> None:
    model = memorised.model
    _, probs = model.generate(memorised.images)
    for rec, row_p, word in zip(model.recognize(memorised.images), probs.tolist(), memorised.words):
        assert rec.text == word
        assert rec.char_confidences == pytest.approx(row_p[: len(word)])
        expected = 1.0
        for q in row_p[: len(word) + 1]:  # characters and EOS
            expected *= q
        assert rec.confidence == pytest.approx(expected)
        assert 0.2 < rec.confidence <= 1.0  # focal loss (gamma 2) stops pushing at p ~ 0.9 per char


def test_recognize_restores_training_mode(tiny_model: SAFL) -> None:
    model = copy.deepcopy(tiny_model).train()
    model.recognize(_words_batch(model, ["a"]))
    assert model.training
    model.eval()
    model.recognize(_words_batch(model, ["a"]))
    assert not model.training


def test_bf16_autocast_decoding(memorised: Memorised) -> None:
    recs = memorised.model.recognize(memorised.images, amp_dtype=torch.bfloat16)
    assert [r.text for r in recs] == memorised.words


# -- learning -----------------------------------------------------------------------------------


def test_tiny_model_memorises_a_handful_of_words(memorised: Memorised) -> None:
    """Real training pieces, CPU, one thread: loss falls and greedy decoding reads every word."""
    assert memorised.matched_at is not None, f"not memorised in {memorised.steps} steps; last loss {memorised.losses[-1]:.3f}"
    assert memorised.matched_at <= 200
    first = sum(memorised.losses[:3]) / 3
    last = sum(memorised.losses[-3:]) / 3
    assert last < 0.05 * first
    recs = memorised.model.recognize(memorised.images)
    assert [r.text for r in recs] == WORDS
    # A word it has not seen is not simply one of the memorised labels with full confidence.
    other = memorised.model.recognize(_words_batch(memorised.model, ["xylophone"]))[0]
    assert not (other.text in WORDS and other.confidence > 0.99)


def test_tps_points_stay_within_the_offset_bound() -> None:
    # Unbounded points drifted outside the image in real training; the tanh bound forbids it.
    from model.rectify import TPSRectifier, fiducial_points

    rect = TPSRectifier(1, 32, 128, 20, max_offset=0.75, monotone=False)
    with torch.no_grad():
        rect.fc.weight.normal_(0, 50.0)
        rect.fc.bias.fill_(100.0)
    pts = rect.points(torch.randn(4, 1, 32, 128))
    assert (pts - fiducial_points(20)).abs().max() <= 0.75 + 1e-6


@pytest.mark.parametrize("scale", [0.5, 5.0, 50.0])
def test_monotone_tps_points_never_fold(scale: float) -> None:
    # The shipped (non-monotone) head learned top-edge points that fold back on each other,
    # which cut the first letter off every crop; the monotone parameterisation cannot fold.
    from model.rectify import MAX_LOG_ZOOM, MAX_SHIFT, TPSRectifier

    torch.manual_seed(1)
    rect = TPSRectifier(1, 32, 128, 20, max_offset=0.75)
    with torch.no_grad():
        rect.fc.weight.normal_(0, scale)
        rect.fc.bias.normal_(0, scale)
    pts = rect.points(torch.randn(16, 1, 32, 128))
    top, bottom = pts[:, :10], pts[:, 10:]
    for edge in (top, bottom):
        assert (edge[:, 1:, 0] - edge[:, :-1, 0] >= 0).all()  # x never goes back
        span = edge[:, -1, 0] - edge[:, 0, 0]
        assert (span >= 2 * math.exp(-MAX_LOG_ZOOM) - 1e-5).all() and (span <= 2 * math.exp(MAX_LOG_ZOOM) + 1e-5).all()
        assert ((edge[:, 0, 0] + edge[:, -1, 0]).abs() / 2 <= MAX_SHIFT + 1e-5).all()
    assert (top[..., 1] < bottom[..., 1]).all()  # the top edge stays above the bottom one


def test_an_allowlist_constrains_every_reading_of_the_batch_row_by_row(tiny_model) -> None:
    images = torch.rand(4, 1, 32, 128)
    digits = tiny_model.charset.token_mask("0123456789")
    only_digits = DecodeOptions(allowed=digits)
    free = tiny_model.recognize(images)
    constrained = tiny_model.recognize(images, options=[only_digits, only_digits, DecodeOptions(), only_digits])
    assert not set(free[0].text) <= set("0123456789")  # unconstrained, this model reads letters and symbols
    assert all(r.text and set(r.text) <= set("0123456789") for i, r in enumerate(constrained) if i != 2)
    assert constrained[2] == free[2]  # an unconstrained row reads as without any mask
