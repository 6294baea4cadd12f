"""The comparison forms of a word under the STR evaluation protocol (one home for both)."""

from __future__ import annotations

import re

from ..charset import base_letter

_NOT_36 = re.compile(r"[^0-9a-z]")


def normalize_36(text: str, fold: bool = True) -> str:
    """Lowercase, alphanumerics only: the STR benchmark protocol (36 characters). With
    ``fold``, accented letters count as their base letter first (``CAFÉ`` → ``cafe``, what
    a model trained on folded labels answers) instead of being dropped (``caf``)."""
    if fold:
        text = "".join(base_letter(c) or c for c in text)
    return _NOT_36.sub("", text.lower())


def normalize_cs(text: str) -> str:
    """Case-sensitive comparison form: whitespace removed, everything else kept."""
    return "".join(text.split())
