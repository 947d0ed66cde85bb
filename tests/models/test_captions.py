"""Caption normalisation (LAVIS pre_caption) and detail-term matching."""

from __future__ import annotations

import pytest

from models.captions import match_terms, pre_caption, word_tokens


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Axial CT (arrow) shows a lesion.", "axial ct arrow shows a lesion"),
        ('"Quoted"!  text*#:;~ end.', "quoted text end"),
        ("  leading and trailing  \n", "leading and trailing"),
        ("keeps, commas / slashes - and hyphens", "keeps, commas / slashes - and hyphens"),
        ("T2-weighted MRI: 3.5 cm mass", "t2-weighted mri 3 5 cm mass"),
        ("single\ttab survives", "single\ttab survives"),  # LAVIS collapses only runs of 2+ whitespace
        ("...", ""),
    ],
)
def test_pre_caption_matches_lavis(raw: str, expected: str) -> None:
    assert pre_caption(raw) == expected


def test_pre_caption_truncates_to_max_words() -> None:
    text = " ".join(f"w{i}" for i in range(60))
    assert pre_caption(text).split(" ") == [f"w{i}" for i in range(50)]
    assert pre_caption("one two three. four", max_words=3) == "one two three"
    with pytest.raises(ValueError, match="max_words"):
        pre_caption("x", max_words=0)


def test_word_tokens_split_on_punctuation_but_keep_inner_hyphens() -> None:
    assert word_tokens("Left, RIGHT; t2-weighted (axial).") == ["left", "right", "t2-weighted", "axial"]


def test_match_terms_prefers_the_longest_phrase_without_overlap() -> None:
    terms = ["lesion", "no focal lesion", "left"]
    assert match_terms("Axial CT. No focal lesion.", terms) == ["no focal lesion"]
    assert match_terms("small lesion in the left lung; another lesion", terms) == ["lesion", "left", "lesion"]
    assert match_terms("leftover lesions", terms) == []  # whole words only
