"""Beam search (top_k), lexicon-constrained decoding and mixed decode options in one batch,
checked against teacher-forced scoring of the same strings by the same decoder."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from conftest import render_word

from model import SAFL, load_checkpoint
from model.charset import BOS_ID, EOS_ID, NUM_SPECIAL, PAD_ID, Charset
from model.lexicon import Lexicon, read_lexicon
from model.preprocess import collate, preprocess
from model.search import MAX_TOP_K, DecodeOptions
from model.training.train import with_charset


@pytest.fixture(scope="module")
def memorised(memorised_checkpoint: tuple[Path, list[str]]) -> tuple[SAFL, list[str], torch.Tensor]:
    path, words = memorised_checkpoint
    model, _ = load_checkpoint(path)
    images = collate([preprocess(render_word(w), model.config.preprocess) for w in words])
    assert [r.text for r in model.recognize(images)] == words
    return model.eval(), words, images


def log_prob(model: SAFL, image: torch.Tensor, texts: list[str]) -> list[float]:
    """The model's log-probability of each whole string (end token included) for one image,
    by one teacher-forced pass: independent of the incremental decoding under test."""
    inp, tgt = model.charset.encode_batch(texts)
    with torch.no_grad():
        memory = model.encode(image[None]).expand(len(texts), -1, -1)
        logits = model.decoder(inp, memory).float()
    logits[..., [PAD_ID, BOS_ID]] = -math.inf
    lp = logits.log_softmax(-1).gather(-1, tgt[..., None])[..., 0]
    return lp.masked_fill(tgt == PAD_ID, 0.0).sum(-1).tolist()


def lexicon(model: SAFL, words: list[str]) -> Lexicon:
    return Lexicon.build(words, model.charset, model.config.max_len)


def test_top_k_gives_k_distinct_readings_most_probable_first_with_their_true_probability(memorised) -> None:
    model, words, images = memorised
    recs = model.recognize(images, options=DecodeOptions(top_k=3))
    for rec, word, image in zip(recs, words, images):
        alts = rec.alternatives
        assert len(alts) == 3 and alts[0].text == rec.text == word
        assert rec.confidence == alts[0].confidence
        assert len({a.text for a in alts}) == 3
        assert all(a.confidence >= b.confidence for a, b in zip(alts, alts[1:]))
        expected = log_prob(model, image, [a.text for a in alts])
        assert [math.log(a.confidence) for a in alts] == pytest.approx(expected, abs=1e-3)
        assert math.prod(rec.char_confidences) * 1.0 >= rec.confidence  # the end token's probability is the rest


def test_a_lexicon_answer_is_the_lexicons_most_probable_word(tiny_model: SAFL) -> None:
    # An untrained model reads nothing in particular, so the lexicon alone decides; 30
    # words < LEXICON_BEAM_WIDTH, so the search is exhaustive and must find the argmax.
    torch.manual_seed(1)
    images = torch.rand(3, 1, 32, 128)
    words = ["cat", "Cat", "house", "TREE", "tree", "river42", "Moon", "zebra", "a", "ab", "abc", "abcd"] + [f"w{i}x" for i in range(18)]
    lex = lexicon(tiny_model, words)
    recs = tiny_model.recognize(images, options=DecodeOptions(lexicon=lex, top_k=5))
    for rec, image in zip(recs, images):
        scores = log_prob(tiny_model, image, words)
        ranked = sorted(range(len(words)), key=lambda i: -scores[i])
        assert rec.text == words[ranked[0]]
        assert [a.text for a in rec.alternatives] == [words[i] for i in ranked[:5]]
        assert math.log(rec.confidence) == pytest.approx(scores[ranked[0]], abs=1e-3)
        assert len(rec.char_confidences) == len(rec.text)


def test_a_lexicon_reads_a_learnt_word_as_itself_and_an_unknown_word_as_a_listed_one(memorised) -> None:
    model, words, images = memorised
    recs = model.recognize(images, options=DecodeOptions(lexicon=lexicon(model, [*words, "cab", "mouse", "River", "z"])))
    assert [r.text for r in recs] == words
    others = ["dog", "horse", "Tree42", "moon"]
    recs = model.recognize(images, options=DecodeOptions(lexicon=lexicon(model, others)))
    assert all(r.text in others for r in recs)


def test_mixed_options_in_one_batch_read_as_each_would_alone(memorised) -> None:
    model, words, images = memorised
    digits = model.charset.token_mask("0123456789")
    lex = lexicon(model, ["house", "mouse", "TREE"])
    options = [
        DecodeOptions(),
        DecodeOptions(allowed=digits),
        DecodeOptions(top_k=2),
        DecodeOptions(lexicon=lex),
        DecodeOptions(allowed=digits, top_k=4),
        DecodeOptions(lexicon=lex, top_k=2),
    ]
    together = model.recognize(images, options=options)
    alone = [model.recognize(images[i : i + 1], options=o)[0] for i, o in enumerate(options)]
    for a, b in zip(together, alone):
        assert a.text == b.text and [x.text for x in a.alternatives] == [x.text for x in b.alternatives]
        assert a.confidence == pytest.approx(b.confidence, rel=1e-4)
    assert together[0].text == words[0] and not together[0].alternatives
    assert set(together[1].text) <= set("0123456789") and together[1].text
    assert all(set(alt.text) <= set("0123456789") for alt in together[4].alternatives)
    assert together[3].text in ("house", "mouse", "TREE") and together[5].alternatives[0].text == together[5].text


def test_beam_search_ends_a_reading_at_max_len_with_the_end_tokens_probability(tiny_model: SAFL) -> None:
    never_ends = copy.deepcopy(tiny_model)
    with torch.no_grad():
        never_ends.decoder.head.bias[EOS_ID] -= 1e4
    rec = never_ends.recognize(torch.rand(1, 1, 32, 128), options=DecodeOptions(top_k=2))[0]
    assert len(rec.text) == never_ends.config.max_len
    assert rec.confidence < 1e-3


def test_decode_options_and_lexicon_refuse_what_they_cannot_do(tiny_model: SAFL, tmp_path: Path) -> None:
    cs, max_len = tiny_model.charset, tiny_model.config.max_len
    with pytest.raises(ValueError, match=f"top_k must be 0 \\(off\\) to {MAX_TOP_K}"):
        DecodeOptions(top_k=MAX_TOP_K + 1)
    with pytest.raises(ValueError, match="cannot be combined"):
        DecodeOptions(allowed=cs.token_mask("0123"), lexicon=lexicon(tiny_model, ["12"]))
    with pytest.raises(ValueError, match="no word"):
        Lexicon.build([" ", ""], cs, max_len)
    with pytest.raises(ValueError, match="cannot read: 'é'"):
        Lexicon.build(["ok", "café"], cs, max_len)
    with pytest.raises(ValueError, match=f"reads at most {max_len}"):
        Lexicon.build(["x" * (max_len + 1)], cs, max_len)
    with pytest.raises(ValueError, match="the limit is 2"):
        Lexicon.build(["a", "b", "c"], cs, max_len, max_words=2)
    lex = Lexicon.build([" cat", "cat", "car ", "cart"], cs, max_len)
    assert lex.words == ("cat", "car", "cart") and len(lex) == 3
    assert int(lex.children.shape[0]) == 1 + 3 + 1 + 1  # c-a-t/r share a prefix, cart adds one node
    with pytest.raises(ValueError, match="cannot read: ' '"):
        Lexicon.build(["New York"], cs, max_len)  # this model has no space
    spaced = Charset(cs.chars + " ")
    assert Lexicon.build(["New York", "New  York", "New\tYork "], spaced, max_len).words == ("New York",)
    path = tmp_path / "words.txt"
    path.write_text("cat\n\n  dog \n", encoding="utf-8")
    assert read_lexicon(path) == ["cat", "dog"]
    with pytest.raises(ValueError, match="decode options for"):
        tiny_model.recognize(torch.rand(2, 1, 32, 128), options=[DecodeOptions()])


def test_a_model_reading_the_space_never_offers_the_same_text_twice(memorised) -> None:
    """A reading is answered without spaces at either end; were they searched, ``cat`` and
    ``cat `` (or ``""`` and ``"   "``) would be two alternatives showing the same text, each with
    a probability that is not its text's (what the web page showed with the first model that
    reads the space). The search never starts a reading with a space nor ends one after it."""
    model, words, images = memorised
    spaced = with_charset(model, model.config.charset + " ").eval()
    space = spaced.charset.space_id
    assert space is not None and model.charset.space_id is None
    with torch.no_grad():  # the space about as likely as any word's next letter, at either end too
        spaced.decoder.head.bias[space] = float(spaced.decoder.head.bias[NUM_SPECIAL:].max()) + 6.0
    recs = spaced.recognize(images, options=DecodeOptions(top_k=3))
    assert [r.text for r in recs] == words
    for rec, image in zip(recs, images):
        texts = [a.text for a in rec.alternatives]
        assert len(set(texts)) == len(texts) and all(t == t.strip() for t in texts), texts
        expected = [math.exp(lp) for lp in log_prob(spaced, image, texts)]
        assert [a.confidence for a in rec.alternatives] == pytest.approx(expected, rel=1e-3, abs=1e-9), texts
