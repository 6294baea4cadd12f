"""The charset / tokenizer: ids, round trips, the unknown-character policy, decoding rules."""

from __future__ import annotations

import random
import string

import pytest
import torch

from model import Charset
from model.charset import BOS_ID, DEFAULT_CHARS, EOS_ID, NUM_SPECIAL, PAD_ID


def test_default_charset_is_printable_ascii_without_space() -> None:
    cs = Charset()
    assert cs.chars == DEFAULT_CHARS
    assert len(cs.chars) == 94
    assert set(cs.chars) == set(string.printable) - set(string.whitespace)
    assert cs.vocab_size == 94 + NUM_SPECIAL
    assert (PAD_ID, BOS_ID, EOS_ID, NUM_SPECIAL) == (0, 1, 2, 3)


def test_ids_follow_charset_order_after_the_specials() -> None:
    cs = Charset("xyz")
    assert cs.encode("zyx") == [5, 4, 3]
    assert cs.vocab_size == 6
    assert "x" in cs and "a" not in cs


@pytest.mark.parametrize("text", ["", "a", "Hello", "R2-D2", "$12.50", "e-mail@x.org", DEFAULT_CHARS])
def test_encode_decode_round_trip(text: str) -> None:
    cs = Charset()
    ids = cs.encode(text)
    assert len(ids) == len(text)
    assert all(NUM_SPECIAL <= i < cs.vocab_size for i in ids)
    assert cs.decode(ids) == text


def test_random_round_trips() -> None:
    cs = Charset()
    rng = random.Random(0)
    for _ in range(200):
        text = "".join(rng.choice(DEFAULT_CHARS) for _ in range(rng.randint(1, 25)))
        assert cs.decode(cs.encode(text)) == text
        # The same through the EOS-terminated form the decoder produces.
        assert cs.decode(cs.encode(text) + [EOS_ID, PAD_ID, PAD_ID]) == text


def test_encode_unknown_character_raises_naming_it() -> None:
    with pytest.raises(KeyError, match="'é' is not in the charset"):
        Charset().encode("café")
    with pytest.raises(KeyError, match="' '"):
        Charset().encode("two words")


def test_decode_stops_at_eos() -> None:
    cs = Charset()
    ids = cs.encode("ab") + [EOS_ID] + cs.encode("cd")
    assert cs.decode(ids) == "ab"
    assert cs.decode([EOS_ID] + cs.encode("x")) == ""


def test_special_ids_are_never_decoded() -> None:
    cs = Charset()
    ids = [BOS_ID] + cs.encode("a") + [PAD_ID, BOS_ID] + cs.encode("b") + [PAD_ID]
    assert cs.decode(ids) == "ab"
    assert cs.decode([PAD_ID, BOS_ID, PAD_ID]) == ""
    # Every single special id decodes to nothing; every other id to exactly one character.
    for i in range(cs.vocab_size):
        assert len(cs.decode([i])) == (0 if i < NUM_SPECIAL else 1)


def test_encode_batch_gives_teacher_forcing_inputs_and_targets() -> None:
    cs = Charset()
    inp, tgt = cs.encode_batch(["ab", "", "xyz"])
    assert inp.shape == tgt.shape == (3, 4) and inp.dtype == tgt.dtype == torch.long
    a, b = cs.encode("ab")
    assert inp[0].tolist() == [BOS_ID, a, b, PAD_ID]
    assert tgt[0].tolist() == [a, b, EOS_ID, PAD_ID]
    assert inp[1].tolist() == [BOS_ID, PAD_ID, PAD_ID, PAD_ID]
    assert tgt[1].tolist() == [EOS_ID, PAD_ID, PAD_ID, PAD_ID]
    assert tgt[2].tolist() == cs.encode("xyz") + [EOS_ID]
    # Teacher forcing: input is the target shifted right behind BOS.
    assert torch.equal(inp[2, 1:], tgt[2, :-1])
    with pytest.raises(KeyError, match="'é' is not in the charset"):
        cs.encode_batch(["café"])


def test_filter_label_policy() -> None:
    cs = Charset()
    assert cs.filter_label("Hello", 25) == "Hello"
    assert cs.filter_label("New York", 25) == "NewYork"  # spaces removed
    assert cs.filter_label("café", 25) == "cafe"  # an accent the charset lacks: folded
    assert cs.filter_label("5€", 25) is None  # unknown character: skipped, not mangled
    assert cs.filter_label("tab\there", 25) is None
    assert cs.filter_label("", 25) is None
    assert cs.filter_label("   ", 25) is None
    assert cs.filter_label("a" * 25, 25) == "a" * 25
    assert cs.filter_label("a" * 26, 25) is None  # too long for the decoder
    assert cs.filter_label("a b c d", 4) == "abcd"  # length counted after dropping spaces
    assert cs.filter_label("a b c d", 3) is None


def test_filter_label_with_restricted_charset() -> None:
    cs = Charset(string.digits)
    assert cs.filter_label("2024", 10) == "2024"
    assert cs.filter_label("20a4", 10) is None


@pytest.mark.parametrize("chars", ["", "abca"])
def test_invalid_charsets_rejected(chars: str) -> None:
    with pytest.raises(ValueError):
        Charset(chars)


def test_decode_batch_never_contains_specials() -> None:
    """``decode_batch`` stops at EOS / PAD / BOS and multiplies in the EOS probability."""
    cs = Charset()
    ids = torch.tensor(
        [
            cs.encode("ab") + [EOS_ID, PAD_ID],
            [EOS_ID, PAD_ID, PAD_ID, PAD_ID],
            cs.encode("abcd"),  # ran out of room without EOS
            cs.encode("a") + [PAD_ID] + cs.encode("bc"),
        ]
    )
    probs = torch.tensor([[0.5, 0.5, 0.8, 1.0], [0.9, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.5], [0.5, 1.0, 1.0, 1.0]])
    recs = cs.decode_batch(ids, probs)
    assert [r.text for r in recs] == ["ab", "", "abcd", "a"]
    assert recs[0].confidence == pytest.approx(0.5 * 0.5 * 0.8)
    assert recs[0].char_confidences == [0.5, 0.5]
    assert recs[1].confidence == pytest.approx(0.9) and recs[1].char_confidences == []
    assert recs[2].confidence == pytest.approx(0.5)
    assert recs[3].confidence == pytest.approx(0.5)


def test_accented_letters_are_learnt_as_their_base_letter_when_the_charset_lacks_them() -> None:
    cs = Charset()
    assert cs.fold("Café Ölçü") == "Cafe Olcu"
    assert cs.filter_label("Café", 25) == "Cafe"
    assert cs.filter_label("straße", 25) is None  # ß has no base letter: left out, not guessed
    assert cs.filter_label("€5", 25) is None
    assert cs.filter_label("don´t", 25) is None  # a lone accent is no letter
    assert Charset(DEFAULT_CHARS + "é").filter_label("Café", 25) == "Café"  # a charset with é keeps it
    assert cs.drop_reasons(["Café", "€5", "ok"], 25) == "1 with characters outside the charset ('€'); 1 learnt with accents folded ('é' → 'e')"


def test_only_accents_are_folded_never_compatibility_forms() -> None:
    from model.training.protocol import normalize_36

    assert Charset().fold("ACME™ m² ﬁne Ｈｉ") == "ACME™ m² ﬁne Ｈｉ"  # left for filter_label to refuse
    assert normalize_36("CAFÉ") == "cafe" and normalize_36("CAFÉ", fold=False) == "caf"


def test_token_mask_allows_the_listed_characters_and_the_end() -> None:
    cs = Charset()
    assert cs.token_mask() is None
    digits = cs.token_mask("0123456789")
    assert digits is not None and digits.dtype == torch.bool and digits.shape == (cs.vocab_size,)
    assert digits.sum() == 11 and digits[EOS_ID] and not digits[PAD_ID] and not digits[BOS_ID]
    no_vowels = cs.token_mask(blocklist="aeiou")
    assert no_vowels is not None and int(no_vowels.sum()) == len(DEFAULT_CHARS) - 5 + 1
    with pytest.raises(ValueError, match="'é'"):
        cs.token_mask("abé")
    with pytest.raises(ValueError, match="leaves no character"):
        cs.token_mask("ab", "ab")
    spaced = Charset(DEFAULT_CHARS + " ")
    assert int(spaced.token_mask("1 ").sum()) == 3  # '1', the space, the end
    with pytest.raises(ValueError, match="leaves no character"):
        spaced.token_mask(" ")  # a space alone can only read as ""


def test_a_charset_with_the_space_keeps_single_spaces_between_words() -> None:
    spaced = Charset(DEFAULT_CHARS + " ")
    assert spaced.filter_label("  Total:   $14.99 ", 25) == "Total: $14.99"
    assert Charset().filter_label("  Total:   $14.99 ", 25) == "Total:$14.99"  # a word reader, as before
    assert spaced.filter_label("   ", 25) is None
    assert "1 learnt with accents folded" in spaced.drop_reasons(["Café  au lait"], 25)


def test_a_reading_never_starts_or_ends_with_a_space() -> None:
    spaced = Charset(DEFAULT_CHARS + " ")
    sp, h, i = spaced.encode(" ")[0], spaced.encode("H")[0], spaced.encode("i")[0]
    ids = torch.tensor([[sp, h, sp, i, sp, EOS_ID], [h, i, EOS_ID, PAD_ID, PAD_ID, PAD_ID]])
    probs = torch.tensor([[0.5, 0.9, 0.8, 0.7, 0.6, 0.95], [0.9, 0.8, 0.9, 1.0, 1.0, 1.0]])
    first, second = spaced.decode_batch(ids, probs)
    assert first.text == "H i" and first.char_confidences == pytest.approx([0.9, 0.8, 0.7])
    assert first.confidence == pytest.approx(0.5 * 0.9 * 0.8 * 0.7 * 0.6 * 0.95)  # the probability of what was read
    assert second.text == "Hi"
    assert spaced.decode([sp, sp, h, sp]) == "H"
