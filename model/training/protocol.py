"""The comparison forms of a word under the STR evaluation protocol (one home for both)."""

from __future__ import annotations

import re

_NOT_36 = re.compile(r"[^0-9a-z]")


def normalize_36(text: str) -> str:
    """Lowercase, alphanumerics only: the STR benchmark protocol (36 characters)."""
    return _NOT_36.sub("", text.lower())


def normalize_cs(text: str) -> str:
    """Case-sensitive comparison form: whitespace removed, everything else kept."""
    return "".join(text.split())
