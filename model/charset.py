"""Character set and tokenizer shared by the model, training and serving: the one home of
the token ids, of turning labels into ids (``Charset.encode``, ``Charset.encode_batch``)
and of turning ids back into text (``Charset.decode``, ``Charset.decode_batch``), as
PARSeq's ``strhub.data.utils.Tokenizer`` does for its models.

Token ids: ``0`` is padding, ``1`` begin-of-sequence, ``2`` end-of-sequence, and the
characters follow from ``3`` in charset order. The charset string is stored in every
checkpoint, so a model always decodes with the alphabet it was trained on.
"""

from __future__ import annotations

import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .reading import Recognition

if TYPE_CHECKING:
    import numpy as np
    import torch

PAD_ID = 0  #: padding: decoder inputs and targets after a label's end; never predicted
BOS_ID = 1  #: begin-of-sequence: the decoder's first input; never predicted
EOS_ID = 2  #: end-of-sequence: the target after a label's last character
NUM_SPECIAL = 3  #: the special ids above come first; character ids start here

#: The 94 printable, non-space ASCII characters: digits, lower, upper, punctuation.
DEFAULT_CHARS = string.digits + string.ascii_lowercase + string.ascii_uppercase + string.punctuation


def base_letter(c: str) -> str | None:
    """The unaccented letter of an accented one (canonical decomposition, NFD, without its
    combining marks): ``é`` → ``e``, ``Ö`` → ``O``; ``None`` for anything else, so
    compatibility forms (``™``, ``²``, ``ﬁ``, full-width letters) are never rewritten into
    text the image does not show."""
    if not unicodedata.category(c).startswith("L"):
        return None
    base = "".join(d for d in unicodedata.normalize("NFD", c) if not unicodedata.combining(d))
    return base if len(base) == 1 and base != c else None


@dataclass(frozen=True)
class Charset:
    """An ordered alphabet plus the decoder's special tokens: the tokenizer.

    Policy for characters outside the set: an accented letter whose base letter is in
    the set is learnt as that letter (``fold``: ``Café`` → ``Cafe``, what the model can
    honestly answer, as PARSeq's data loading does); ``filter_label`` returns ``None``
    for a training label that still holds any other (the sample is skipped rather than
    learnt with a silently wrong target); ``decode`` can never emit them because the
    model has no token for them.
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

    @property
    def space_id(self) -> int | None:
        """The space's token id, ``None`` for a set without it (a model that cannot read a space)."""
        return self._index.get(" ")

    def fold(self, text: str) -> str:
        """``text`` with each letter outside the set replaced by its base letter
        (``base_letter``) when that is in the set: ``é`` → ``e``, ``Ö`` → ``O``; anything
        else (``€``, ``ß``, ``™``, a lone ``´``) is left as it is. Same length as ``text``."""
        return "".join(c if c in self._index or (b := base_letter(c)) is None or b not in self._index else b for c in text)

    def spaced(self, text: str) -> str:
        """``text`` with its spaces as the model reads them: without a space in the set, none
        (a word reader; annotations sometimes join several words with one); with it, one
        between words and none at either end."""
        return " ".join(text.split()) if " " in self._index else text.replace(" ", "")

    def filter_label(self, text: str, max_len: int) -> str | None:
        """Return ``text`` as the model learns it (spaces as ``spaced`` leaves them, accents
        folded, ``fold``) if it is trainable (non-empty, in-set, short enough), else ``None``.
        """
        text = self.fold(self.spaced(text))
        if not text or len(text) > max_len:
            return None
        if any(c not in self._index for c in text):
            return None
        return text

    def drop_reasons(self, labels: list[str], max_len: int) -> str:
        """Why ``filter_label`` leaves labels out, counted, and how many it learns with accents
        folded: e.g. ``"3 with characters outside the charset ('€', 'ß'), 1 longer than 25;
        2 learnt with accents folded ('é' → 'e')"``; ``""`` when every label is kept as is."""
        outside: dict[str, None] = {}
        folded: dict[str, str] = {}
        counts = {"outside": 0, "long": 0, "empty": 0, "folded": 0}
        for lab in labels:
            raw = self.spaced(lab)
            text = self.fold(raw)
            if text != raw and all(c in self._index for c in text):
                counts["folded"] += 1
                folded.update((a, b) for a, b in zip(raw, text, strict=True) if a != b)
            if not text:
                counts["empty"] += 1
            elif any(c not in self._index for c in text):
                counts["outside"] += 1
                outside.update(dict.fromkeys(c for c in text if c not in self._index))
            elif len(text) > max_len:
                counts["long"] += 1
        shown = ", ".join(repr(c) for c in list(outside)[:8]) + (", …" if len(outside) > 8 else "")
        parts = [
            f"{counts['outside']} with characters outside the charset ({shown})" if counts["outside"] else "",
            f"{counts['long']} longer than {max_len}" if counts["long"] else "",
            f"{counts['empty']} empty" if counts["empty"] else "",
        ]
        dropped = ", ".join(p for p in parts if p)
        if not counts["folded"]:
            return dropped
        pairs = ", ".join(f"{a!r} → {b!r}" for a, b in list(folded.items())[:6]) + (", …" if len(folded) > 6 else "")
        return "; ".join(p for p in (dropped, f"{counts['folded']} learnt with accents folded ({pairs})") if p)

    def token_mask(self, allowlist: str | None = None, blocklist: str | None = None) -> torch.Tensor | None:
        """The tokens a reading may emit, as bool ``[vocab_size]``: the characters of
        ``allowlist`` (all when ``None``) minus those of ``blocklist``, and the end token;
        ``None`` when neither is given. Raises ``ValueError`` naming a character outside the
        charset, or for an allowlist that leaves no character but the space."""
        if allowlist is None and blocklist is None:
            return None
        for name, chars in (("allowlist", allowlist), ("blocklist", blocklist)):
            unknown = sorted({c for c in chars or "" if c not in self._index})
            if unknown:
                raise ValueError(f"{name} has characters the model cannot read: {''.join(unknown)!r}")
        keep = set(self.chars if allowlist is None else allowlist) - set(blocklist or "")
        if not keep - {" "}:  # a reading never starts or ends with a space: spaces alone read as ""
            raise ValueError("the allowlist leaves no character to read" + (" once the blocklist is removed" if blocklist else ""))
        import torch

        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        mask[[self._index[c] for c in keep]] = True
        mask[EOS_ID] = True
        return mask

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS); raises ``KeyError`` on an unknown char."""
        try:
            return [self._index[c] for c in text]
        except KeyError as exc:
            raise KeyError(f"character {exc.args[0]!r} is not in the charset") from None

    def encode_batch(self, labels: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forcing tensors of a batch of labels, on the CPU: decoder inputs
        ``[BOS, c1..cn, PAD…]`` and targets ``[c1..cn, EOS, PAD…]``, both int64 ``[B, T]``
        with ``T`` = the longest label's length + 1 (the inputs are the targets shifted
        right behind BOS).

        Raises ``KeyError`` naming a character outside the charset (``encode``), and
        ``ValueError`` for an empty batch.
        """
        import torch

        t = max(len(s) for s in labels) + 1
        inp = torch.full((len(labels), t), PAD_ID, dtype=torch.long)
        tgt = torch.full((len(labels), t), PAD_ID, dtype=torch.long)
        for i, s in enumerate(labels):
            ids = self.encode(s)
            inp[i, 0] = BOS_ID
            inp[i, 1 : len(ids) + 1] = torch.tensor(ids, dtype=torch.long)
            tgt[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            tgt[i, len(ids)] = EOS_ID
        return inp, tgt

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``, stopping at the first EOS and skipping other specials; never
        starting or ending with a space (``trim_spaces``)."""
        out = []
        for i in ids:
            if i == EOS_ID:
                break
            if i >= NUM_SPECIAL:
                out.append(self.chars[i - NUM_SPECIAL])
        return trim_spaces(out, [1.0] * len(out))[0]

    def decode_batch(self, ids: torch.Tensor | np.ndarray, probs: torch.Tensor | np.ndarray) -> list[Recognition]:
        """Texts and confidences of greedy decoder output (``TransformerDecoder.greedy``):
        ``ids`` int64 ``[B, L]`` and their probabilities ``[B, L]`` (any float dtype; a
        NumPy array must be float32), tensors on any device; one ``Recognition`` per row.

        A row is read up to its first EOS, PAD or BOS. The confidence is the product of
        the characters' probabilities and the EOS probability, so it is the probability of
        the whole string (an empty reading has the EOS probability); a row that ends
        without EOS has its characters' product. Raises ``IndexError`` for an id at or
        above ``vocab_size``.
        """
        out = []
        # As float32 values, whichever array type: the product is then the same for both.
        rows_p = probs.float().tolist() if hasattr(probs, "float") else probs.tolist()
        for row_ids, row_p in zip(ids.tolist(), rows_p):
            chars, confs, total = [], [], 1.0
            for i, p in zip(row_ids, row_p):
                if i in (PAD_ID, BOS_ID):
                    break
                total *= p
                if i == EOS_ID:
                    break
                chars.append(self.chars[i - NUM_SPECIAL])
                confs.append(p)
            text, confs = trim_spaces(chars, confs)
            out.append(Recognition(text, total, confs))
        return out


def trim_spaces(chars: Sequence[str], confs: Sequence[float]) -> tuple[str, list[float]]:
    """The reading without spaces at either end, and the confidences of what is left: a
    model that reads the space may emit one first or last (a word's margin), which no user
    wants; the reading's probability (``Recognition.confidence``) still counts them."""
    start, end = 0, len(chars)
    while start < end and chars[start] == " ":
        start += 1
    while end > start and chars[end - 1] == " ":
        end -= 1
    return "".join(chars[start:end]), list(confs[start:end])


def token_ids(chars: str, into: Charset) -> torch.Tensor:
    """For each token id of a model reading ``chars`` (the special tokens first), its id in
    ``into``: a ``[NUM_SPECIAL + len(chars)]`` int64 tensor. Used where two models' vocabularies
    meet (averaging checkpoints, distilling one into another). Raises ``KeyError`` naming the
    first of ``chars`` that ``into`` lacks (the charsets must nest)."""
    import torch

    return torch.tensor(list(range(NUM_SPECIAL)) + [into.encode(ch)[0] for ch in chars])
