"""A closed vocabulary: the words a reading may be, as a trie over the charset's tokens.

With a lexicon the answer is the most probable word of the list under the model (the
IIIT5K lexicon protocol, Mishra et al., BMVC 2012), found by beam search constrained to
the trie (``model.search``), not by matching a free reading to the nearest word afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .charset import EOS_ID, Charset

#: Most words a request's lexicon may hold. Decoding cost grows with the beam (exhaustive up
#: to 50 words, bounded after), not with the list; the trie table does grow with it (at most
#: words x max_len rows of vocab_size int32: 9.7 MB for 1,000 words of 25 characters).
MAX_LEXICON_WORDS = 1000
#: Most words of the server's default lexicon (``SAFL_LEXICON``), built once at start-up.
MAX_DEFAULT_LEXICON_WORDS = 20000


@dataclass(frozen=True, eq=False)
class Lexicon:
    """Words as a trie over token ids.

    ``children`` int32 ``[nodes, vocab_size]``: the node after each token, −1 where no word
    continues so; node 0 is the root (empty prefix). ``ends`` bool ``[nodes]``: a word ends
    at the node (the end token is allowed there). Build with ``Lexicon.build``.
    """

    words: tuple[str, ...]
    children: torch.Tensor
    ends: torch.Tensor

    @classmethod
    def build(cls, words: Iterable[str], charset: Charset, max_len: int, max_words: int = MAX_LEXICON_WORDS) -> Lexicon:
        """A lexicon of ``words`` (surrounding whitespace stripped, each inner run of whitespace
        one space, blank and repeated words dropped, order kept). Words are read as written: case
        counts. An entry of several words (``New York``) needs a model that reads the space.

        Raises ``ValueError`` naming the problem: no word, more than ``max_words`` (repeats
        counted), a word
        longer than ``max_len`` characters, or a character outside ``charset``.
        """
        # One space between words, as the model reads them: "New  York" is "New York", one entry.
        given = [" ".join(w.split()) for w in words if w.strip()]
        if not given:
            raise ValueError("the lexicon has no word")
        if len(given) > max_words:  # counted before removing repeats: a long list costs before it shrinks
            raise ValueError(f"the lexicon has {len(given)} words; the limit is {max_words}")
        unique = list(dict.fromkeys(given))
        for word in unique:
            if len(word) > max_len:
                raise ValueError(f"lexicon word {word[:40]!r} has {len(word)} characters; the model reads at most {max_len}")
            unknown = sorted({c for c in word if c not in charset})
            if unknown:
                raise ValueError(f"lexicon word {word[:40]!r} has characters the model cannot read: {''.join(unknown)!r}")
        table: list[dict[int, int]] = [{}]
        ends = [False]
        for word in unique:
            node = 0
            for token in charset.encode(word):
                nxt = table[node].get(token)
                if nxt is None:
                    nxt = table[node][token] = len(table)
                    table.append({})
                    ends.append(False)
                node = nxt
            ends[node] = True
        children = torch.full((len(table), charset.vocab_size), -1, dtype=torch.int32)
        for node, edges in enumerate(table):
            if edges:
                children[node, list(edges)] = torch.tensor(list(edges.values()), dtype=torch.int32)
        return cls(tuple(unique), children, torch.tensor(ends))

    def __len__(self) -> int:
        return len(self.words)

    def allowed(self, nodes: torch.Tensor) -> torch.Tensor:
        """Bool ``[N, vocab_size]``: the tokens that continue a word from each of ``nodes``
        (int64 ``[N]``), the end token where a word ends there."""
        mask = self.children[nodes] >= 0
        mask[:, EOS_ID] = self.ends[nodes]
        return mask


def read_lexicon(path: str | os.PathLike[str]) -> list[str]:
    """The words of a UTF-8 text file, one per line (blank lines skipped), without the byte
    order mark that Windows editors write first.

    Raises ``OSError`` if it cannot be read and ``ValueError`` if it is not UTF-8.
    """
    with open(path, encoding="utf-8-sig") as f:
        return [line.strip() for line in f if line.strip()]
