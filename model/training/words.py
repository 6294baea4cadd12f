"""Text sampling for synthetic crops: English words by real frequency, and the other
kinds of strings scene text holds (numbers, prices, dates, codes, punctuation).

Word frequencies come from the ``wordfreq`` package (offline data shipped in the
wheel). Sampling by true frequency reproduces the skew of real text, which is what
the paper's focal loss targets; a uniform draw over the lexicon is mixed in so rare
words are still seen.
"""

from __future__ import annotations

import functools
import math
import random
import string
from dataclasses import asdict, dataclass, replace

import numpy as np


@dataclass(frozen=True)
class TextMix:
    """Probabilities of each kind of string (normalised when sampling)."""

    word_by_frequency: float = 0.45
    word_uniform: float = 0.25
    number: float = 0.08
    price: float = 0.03
    date: float = 0.03
    code: float = 0.06
    word_with_punct: float = 0.05
    random_chars: float = 0.05
    #: 13-25 characters: URLs, e-mail addresses, phone numbers, compounds. Before this
    #: kind 1.2 % of labels had 13+ characters and the model misread most long tokens.
    long_token: float = 0.07
    #: 2-3 words, numbers or a label and its value, joined by single spaces ("Total: $14.99",
    #: "John Smith", "Exit 12"): what detectors that return lines give. Off by default: only a
    #: model whose charset holds the space can read it (``safl synth --mix phrase=0.1`` renders
    #: with the space added to the charset; a weight above 0 renormalises the mix, so the other
    #: kinds keep their proportions but not the strings a seed drew without phrases).
    phrase: float = 0.0

    @classmethod
    def for_charset(cls, charset: str) -> TextMix:
        """The default mix, with phrases (weight ``SPACED_PHRASE_WEIGHT``) when ``charset`` holds the
        space: what ``safl train --stream-workers`` renders for the model it trains (the base its
        ``--stream-mix`` changes)."""
        return cls(phrase=SPACED_PHRASE_WEIGHT) if " " in charset else cls()

    def check_charset(self, charset: str) -> None:
        """Raises ``ValueError`` for a mix that draws phrases from a charset without the space:
        every phrase would be refused and silently replaced by another kind (stop 34's data)."""
        if self.phrase > 0 and " " not in charset:
            raise ValueError("the phrase kind joins words with spaces: give a charset that holds the space")


#: The phrase weight for a model that reads the space (against the default mix's 1.07: about
#: 8.5 % of crops). ``s34-space2`` read 83.5 % of clean phrases after 6,000 steps at this weight
#: (7.8 % of its crops beside ``long_token=0.15``), words as well as without (weights/TRAINING_LOG.md, stop 34).
SPACED_PHRASE_WEIGHT = 0.1


def mix_item(text: str, flag: str = "--mix") -> tuple[str, float]:
    """One ``--mix`` value (or ``flag``'s), ``KIND=WEIGHT`` → ``(kind, weight)``.

    Raises:
        ValueError: a missing ``=``, a kind ``TextMix`` does not have, or a
            weight that is not a finite number ≥ 0.
    """
    kinds = asdict(TextMix())
    kind, sep, value = text.partition("=")
    if not sep or kind not in kinds:
        raise ValueError(f"{flag} {text!r}: expected KIND=WEIGHT with KIND one of {', '.join(kinds)}")
    try:
        weight = float(value)
    except ValueError:
        weight = -1.0
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{flag} {text!r}: the weight must be a number >= 0")
    return kind, weight


def parse_mix(items: list[str], flag: str = "--mix", base: TextMix | None = None) -> TextMix:
    """``["long_token=0.15", ...]`` → ``base`` (default: ``TextMix()``) with those weights
    changed (the sampler normalises the weights); ``flag`` names the option in messages.

    Raises:
        ValueError: a bad item (``mix_item``), a kind given twice, or weights
            whose sum is 0 or too large to normalise.
    """
    changes: dict[str, float] = {}
    for item in items:
        kind, weight = mix_item(item, flag)
        if kind in changes:
            raise ValueError(f"{flag} {kind} given more than once")
        changes[kind] = weight
    mix = replace(base or TextMix(), **changes)
    total = sum(asdict(mix).values())
    if total <= 0:
        raise ValueError(f"{flag}: at least one weight must be above 0")
    if not math.isfinite(total):
        raise ValueError(f"{flag}: the weights are too large to add up; use smaller numbers (they are normalised)")
    return mix


class Lexicon:
    """English word list with frequencies; the list is ordered by frequency."""

    def __init__(self, size: int = 50000, min_len: int = 1) -> None:
        self.words, self.cdf = _english(size, min_len)

    def by_frequency(self, rng: random.Random) -> str:
        """A word drawn with probability proportional to its frequency in English."""
        i = int(np.searchsorted(self.cdf, rng.random(), side="right"))
        return self.words[min(i, len(self.words) - 1)]

    def uniform(self, rng: random.Random) -> str:
        """A word drawn uniformly from the lexicon."""
        return self.words[rng.randrange(len(self.words))]


@functools.lru_cache(maxsize=4)
def _english(size: int, min_len: int) -> tuple[list[str], np.ndarray]:
    # Cached per process: reading wordfreq's tables takes seconds, and every Renderer
    # (one per render worker, several per test session) needs the same list.
    import wordfreq  # training-only dependency

    words = [w for w in wordfreq.top_n_list("en", size * 2) if w.isascii() and w.isalpha() and len(w) >= min_len][:size]
    freq = np.array([wordfreq.word_frequency(w, "en") for w in words], dtype=np.float64)
    cdf = np.cumsum(freq / freq.sum())
    cdf.flags.writeable = False  # shared between Lexicon instances
    return words, cdf


def _case(word: str, rng: random.Random) -> str:
    r = rng.random()
    if r < 0.4:
        return word.lower()
    if r < 0.7:
        return word.capitalize()
    if r < 0.95:
        return word.upper()
    return "".join(c.upper() if rng.random() < 0.5 else c for c in word)


class TextSampler:
    """Draws label strings of at most ``max_len`` characters from ``charset``."""

    def __init__(self, charset: str, max_len: int, lexicon: Lexicon, mix: TextMix = TextMix()) -> None:
        """Raises ``ValueError`` for a mix that draws phrases from a charset without the space
        (every phrase would be refused and silently replaced by another kind)."""
        mix.check_charset(charset)
        self.charset = charset
        #: The charset less the space: what single tokens are drawn from.
        self.glyphs = charset.replace(" ", "")
        self.max_len = max_len
        self.lexicon = lexicon
        # Kinds of weight 0 are never drawn, not even by the fallback below.
        kinds = [k for k in vars(mix) if getattr(mix, k) > 0]
        weights = np.array([getattr(mix, k) for k in kinds], dtype=np.float64)
        self.kinds = kinds
        self.cum = np.cumsum(weights / weights.sum()).tolist()
        self.punct = "".join(c for c in string.punctuation if c in charset)

    def sample(self, rng: random.Random) -> str:
        """One label; always non-empty, in-charset and at most ``max_len`` long, and with
        single spaces between words only (never at either end)."""
        for _ in range(20):
            r = rng.random()
            kind = next((k for k, c in zip(self.kinds, self.cum) if r < c), self.kinds[-1])
            text = getattr(self, "_" + kind)(rng)
            if text and len(text) <= self.max_len and all(c in self.charset for c in text) and text == " ".join(text.split()):
                return text
        # Only reachable with a tiny charset or max_len: fall back to something legal.
        return self.glyphs[rng.randrange(len(self.glyphs))]

    def _word_by_frequency(self, rng: random.Random) -> str:
        return _case(self.lexicon.by_frequency(rng), rng)

    def _word_uniform(self, rng: random.Random) -> str:
        return _case(self.lexicon.uniform(rng), rng)

    def _number(self, rng: random.Random) -> str:
        r = rng.random()
        if r < 0.5:
            return str(rng.randint(0, 10 ** rng.randint(1, 6)))
        if r < 0.7:
            return f"{rng.uniform(0, 1000):.{rng.randint(1, 2)}f}"
        if r < 0.85:
            return f"{rng.randint(1, 999)},{rng.randint(0, 999):03d}"
        return f"{rng.randint(0, 100)}%"

    def _price(self, rng: random.Random) -> str:
        cur = rng.choice("$$$€£") if rng.random() < 0.9 else ""
        amount = f"{rng.randint(0, 999)}.{rng.randint(0, 99):02d}" if rng.random() < 0.7 else str(rng.randint(1, 9999))
        return cur + amount if cur in self.charset else "$" + amount

    def _date(self, rng: random.Random) -> str:
        d, m, y = rng.randint(1, 28), rng.randint(1, 12), rng.randint(1950, 2030)
        fmt = rng.choice(["{d:02d}/{m:02d}/{y}", "{m}/{d}/{y2:02d}", "{y}-{m:02d}-{d:02d}", "{d}.{m}.{y}", "{h}:{mi:02d}"])
        return fmt.format(d=d, m=m, y=y, y2=y % 100, h=rng.randint(0, 23), mi=rng.randint(0, 59))

    def _code(self, rng: random.Random) -> str:
        n = rng.randint(3, 9)
        alphabet = string.ascii_uppercase + string.digits
        body = "".join(rng.choice(alphabet) for _ in range(n))
        if rng.random() < 0.4:
            cut = rng.randint(1, n - 1)
            body = body[:cut] + rng.choice("-/.") + body[cut:]
        return body

    def _word_with_punct(self, rng: random.Random) -> str:
        w = _case(self.lexicon.by_frequency(rng), rng)
        r = rng.random()
        if r < 0.4:
            return w + rng.choice(".,!?:;'\"")
        if r < 0.55:
            return rng.choice("\"'(#@") + w
        if r < 0.7:
            return w + "'s"
        if r < 0.85:
            return w + rng.choice("-&/") + _case(self.lexicon.by_frequency(rng), rng)
        return "(" + w + ")"

    def _long_token(self, rng: random.Random) -> str:
        # Drawn until it is 13 to max_len characters long: the kind exists for that length.
        for _ in range(20):
            text = self._long_token_draw(rng)
            if 13 <= len(text) <= self.max_len:
                return text
        return text

    def _long_token_draw(self, rng: random.Random) -> str:
        word = lambda: self.lexicon.by_frequency(rng) if rng.random() < 0.6 else self.lexicon.uniform(rng)  # noqa: E731
        r = rng.random()
        if r < 0.25:
            host = word() + rng.choice(("", "-" + word(), word()))
            text = rng.choice(("www.", "", "http://", "https://")) + host + rng.choice((".com", ".org", ".net", ".de", ".co.uk", ".info"))
            text = text.lower() if rng.random() < 0.85 else text.upper()
            return text + (("/" + word()) if rng.random() < 0.3 else "")
        if r < 0.45:
            user = word() + rng.choice((".", "_", "", "-")) + (word() if rng.random() < 0.6 else str(rng.randint(1, 99)))
            return (user + "@" + word() + rng.choice((".com", ".org", ".net", ".de"))).lower()
        if r < 0.6:
            groups = [str(rng.randint(10, 9999)) for _ in range(rng.randint(3, 4))]
            return rng.choice(("+", "")) + rng.choice(("-", ".", "/")).join(groups)
        if r < 0.85:
            parts = [word() for _ in range(rng.randint(2, 3))]
            sep = rng.choice(("", "", "-", "/", "&"))
            return _case(sep.join(parts), rng)
        n = rng.randint(13, 25)
        alphabet = string.ascii_uppercase + string.digits
        return "".join(rng.choice(alphabet + "-./") if 0 < i < n - 1 and rng.random() < 0.1 else rng.choice(alphabet) for i in range(n))

    def _phrase(self, rng: random.Random) -> str:
        r = rng.random()
        if r < 0.25:  # a label and its value
            label = _case(self.lexicon.by_frequency(rng), rng) + rng.choice((":", ":", "", " -"))
            return f"{label} {rng.choice((self._price, self._number, self._date, self._code))(rng)}"
        if r < 0.4:  # a name
            return " ".join(self.lexicon.uniform(rng).capitalize() for _ in range(rng.randint(2, 3)))
        if r < 0.55:  # a word and a number: "Exit 12", "Gate B7", "Room 101"
            return f"{_case(self.lexicon.by_frequency(rng), rng)} {rng.choice((str(rng.randint(1, 999)), self._code(rng)))}"
        words = [self.lexicon.by_frequency(rng) for _ in range(rng.randint(2, 3))]
        return _case(" ".join(words), rng)

    def _random_chars(self, rng: random.Random) -> str:
        n = rng.randint(1, 10)
        pool = self.glyphs if rng.random() < 0.3 else string.ascii_letters + string.digits
        return "".join(rng.choice(pool) for _ in range(n))
