"""Character set and tokenizer shared by the model, training and serving.

Token ids: ``0`` is padding, ``1`` begin-of-sequence, ``2`` end-of-sequence, and the
characters follow from ``3`` in charset order. The charset string is stored in every
checkpoint, so a model always decodes with the alphabet it was trained on.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
NUM_SPECIAL = 3

#: The 94 printable, non-space ASCII characters: digits, lower, upper, punctuation.
DEFAULT_CHARS = string.digits + string.ascii_lowercase + string.ascii_uppercase + string.punctuation


@dataclass(frozen=True)
class Charset:
    """An ordered alphabet plus the decoder's special tokens.

    Policy for characters outside the set: ``filter_label`` returns ``None`` for a
    training label that holds any of them (the sample is skipped rather than learnt
    with a silently wrong target); ``decode`` can never emit them because the model
    has no token for them.
    """

    chars: str = DEFAULT_CHARS
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.chars:
            raise ValueError("charset must not be empty")
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("charset has duplicate characters")
        object.__setattr__(self, "_index", {c: i + NUM_SPECIAL for i, c in enumerate(self.chars)})

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        return len(self.chars) + NUM_SPECIAL

    def __contains__(self, ch: str) -> bool:
        return ch in self._index

    def filter_label(self, text: str, max_len: int) -> str | None:
        """Return ``text`` if it is trainable (non-empty, in-set, short enough), else ``None``.

        Spaces are removed first: the model reads single words and the benchmark
        annotations sometimes join several words with a space.
        """
        text = text.replace(" ", "")
        if not text or len(text) > max_len:
            return None
        if any(c not in self._index for c in text):
            return None
        return text

    def drop_reasons(self, labels: list[str], max_len: int) -> str:
        """Why ``filter_label`` leaves labels out, counted: e.g. ``"3 with characters outside
        the charset ('é', '€'), 1 longer than 25"``; ``""`` when none is left out."""
        outside: dict[str, None] = {}
        counts = {"outside": 0, "long": 0, "empty": 0}
        for lab in labels:
            text = lab.replace(" ", "")
            if not text:
                counts["empty"] += 1
            elif any(c not in self._index for c in text):
                counts["outside"] += 1
                outside.update(dict.fromkeys(c for c in text if c not in self._index))
            elif len(text) > max_len:
                counts["long"] += 1
        shown = ", ".join(repr(c) for c in list(outside)[:8]) + (", …" if len(outside) > 8 else "")
        parts = [f"{counts['outside']} with characters outside the charset ({shown})" if counts["outside"] else "",
                 f"{counts['long']} longer than {max_len}" if counts["long"] else "",
                 f"{counts['empty']} empty" if counts["empty"] else ""]
        return ", ".join(p for p in parts if p)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS); raises ``KeyError`` on an unknown char."""
        try:
            return [self._index[c] for c in text]
        except KeyError as exc:
            raise KeyError(f"character {exc.args[0]!r} is not in the charset") from None

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``, stopping at the first EOS and skipping other specials."""
        out = []
        for i in ids:
            if i == EOS_ID:
                break
            if i >= NUM_SPECIAL:
                out.append(self.chars[i - NUM_SPECIAL])
        return "".join(out)
