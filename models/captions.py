"""Caption text handling shared by training targets, evaluation references and detail scoring.

`pre_caption` reproduces LAVIS ``BlipCaptionProcessor.pre_caption`` (salesforce/LAVIS,
``lavis/processors/blip_processors.py``) so that captions seen in training and references scored
in evaluation are normalised exactly as in BLIP-2 / MSMedCap. `match_terms` finds vocabulary
terms (words or phrases) for the synthetic caption parser and the detail-word metrics.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["match_terms", "pre_caption", "word_tokens"]

_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")
_MULTISPACE = re.compile(r"\s{2,}")
_WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


def pre_caption(text: str, max_words: int = 50) -> str:
    """Lowercase, blank out ``.!"()*#:;~``, collapse whitespace, strip, keep ``max_words`` words.

    Same as LAVIS, quirks included: only runs of two or more whitespace characters
    are collapsed (a lone tab or newline survives), and words are counted by splitting on spaces.
    """
    if max_words < 1:
        raise ValueError(f"max_words must be at least 1, got {max_words}")
    caption = _PUNCTUATION.sub(" ", text.lower())
    caption = _MULTISPACE.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def word_tokens(text: str) -> list[str]:
    """Lowercase words (letters, digits, inner hyphens); all other characters separate words."""
    return _WORD.findall(text.lower())


def match_terms(text: str, terms: Iterable[str]) -> list[str]:
    """Terms (words or phrases) found in ``text``, left to right, without overlaps.

    At each position the longest matching term wins and consumes its words, so with the terms
    ``"no focal lesion"`` and ``"lesion"`` the text "no focal lesion" yields only the phrase.
    """
    by_length = sorted({tuple(word_tokens(t)): t for t in terms if word_tokens(t)}.items(), key=lambda kv: -len(kv[0]))
    words = word_tokens(text)
    found: list[str] = []
    i = 0
    while i < len(words):
        for phrase, term in by_length:
            if tuple(words[i : i + len(phrase)]) == phrase:
                found.append(term)
                i += len(phrase)
                break
        else:
            i += 1
    return found
