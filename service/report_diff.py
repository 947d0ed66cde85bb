"""What a radiologist changed in a draft: a word-level diff of the draft text against the final text."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Literal

_TOKENS = re.compile(r"\s+|[^\s]+")


@dataclass(frozen=True)
class Piece:
    op: Literal["same", "removed", "added"]
    text: str


def word_diff(draft: str, final: str) -> list[Piece]:
    """The final text as pieces kept, removed (from the draft) and added, words and whitespace as tokens."""
    a, b = _TOKENS.findall(draft or ""), _TOKENS.findall(final or "")
    pieces: list[Piece] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag == "equal":
            pieces.append(Piece("same", "".join(a[i1:i2])))
            continue
        if tag in ("delete", "replace"):
            pieces.append(Piece("removed", "".join(a[i1:i2])))
        if tag in ("insert", "replace"):
            pieces.append(Piece("added", "".join(b[j1:j2])))
    return pieces


def changed(draft: str, final: str) -> bool:
    return (draft or "").strip() != (final or "").strip()
