"""Caption metrics against hand-checkable cases. METEOR's JVM starts once for the module."""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from models import caption_metrics
from models.caption_metrics import (
    COCO_METRICS,
    CaptionScorer,
    JavaNotFoundError,
    comparison_table,
    detail_word_scores,
    evaluate_models,
    semantic_scores,
    write_report,
)
from models.synthetic import DETAIL_WORDS

REFS = {
    "1": ["axial ct of the head. small hyperdense lesion in the left hemisphere."],
    "2": ["coronal mr of the chest. no focal lesion."],
    "3": ["sagittal ct of the abdomen. large hypodense lesion in the anterior abdomen.", "Sagittal CT (abdomen): large hypodense lesion."],
}
SAME = {"1": REFS["1"][0], "2": REFS["2"][0], "3": REFS["3"][0]}
PARTIAL = {
    "1": "axial ct of the head. no focal lesion.",
    "2": "coronal mr of the chest. no focal lesion.",
    "3": "sagittal ct of the abdomen. small hyperdense lesion in the posterior abdomen.",
}


@pytest.fixture(scope="module")
def scorer() -> Iterator[CaptionScorer]:
    with CaptionScorer() as s:
        yield s


@pytest.fixture(scope="module")
def scored(scorer: CaptionScorer) -> dict[str, dict[str, float]]:
    return scorer.score_models({"same": SAME, "partial": PARTIAL, "empty": dict.fromkeys(REFS, "")}, REFS)


def test_identical_captions_score_perfectly(scored: dict[str, dict[str, float]]) -> None:
    same = scored["same"]
    assert list(same) == list(COCO_METRICS)
    for metric in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L"):
        assert same[metric] == pytest.approx(1.0, abs=1e-6), metric
    assert same["CIDEr"] > 1.0


def test_partial_overlap_scores_between_empty_and_identical(scored: dict[str, dict[str, float]]) -> None:
    for metric in COCO_METRICS:
        assert scored["empty"][metric] == pytest.approx(0.0, abs=1e-6), metric
        assert 0 < scored["partial"][metric] < scored["same"][metric], metric


def test_hand_checked_bleu_and_rouge(scorer: CaptionScorer) -> None:
    # one image, equal lengths (no brevity penalty): 2 of 4 unigrams and 1 of 3 bigrams match;
    # LCS = 2, so ROUGE-L's precision = recall = 0.5 and its F-measure is 0.5 for any beta.
    refs = {"a": ["the cat sat down"], "b": ["a dog ran off"]}
    scores = scorer.score({"a": "the cat ran up", "b": "a dog ran off"}, refs)
    unigrams, bigrams = (2 + 4) / 8, (1 + 3) / 6
    assert scores["BLEU-1"] == pytest.approx(unigrams, abs=1e-6)
    assert scores["BLEU-2"] == pytest.approx((unigrams * bigrams) ** 0.5, abs=1e-6)
    assert scores["ROUGE-L"] == pytest.approx((0.5 + 1.0) / 2, abs=1e-6)
    assert 0 < scores["METEOR"] < 1 and scores["CIDEr"] > 0


def test_normalise_removes_parentheses_the_ptb_tokenizer_would_keep(scorer: CaptionScorer) -> None:
    refs = {"a": ["ct (arrow) shows a mass"], "b": ["mr shows nothing"]}
    preds = {"a": "ct arrow shows a mass", "b": "mr shows nothing"}
    assert scorer.score(preds, refs)["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    raw = CaptionScorer(meteor=False, normalise=False)
    assert raw.score(preds, refs)["BLEU-4"] < 0.9  # PTB turns "(" into "-lrb-", which then counts as a word


# Flickr-style evaluation: five references per image (`references_by_image` on `read_flickr` records).
FIVE_REFS = {
    "img1.jpg": [
        "A child in a red coat climbs the steps of a wooden house .",
        "A girl walks into a small cabin .",
        "A little girl climbing up to a playhouse .",
        "Kid on the stairs of a treehouse .",
        "A young girl in red is going up wooden stairs .",
    ],
    "img2.jpg": [
        "Two dogs, one black and one spotted, fight on the road .",
        "A black dog and a white dog play together on the street .",
        'Dogs of different breeds look at each other, "curious" .',
        "Two dogs on the pavement moving toward each other .",
        "A black dog is snarling at a spotted dog .",
    ],
    "img3.jpg": [
        "A man in a blue shirt rides a bicycle down a dirt hill .",
        "A cyclist jumps over a mound of dirt .",
        "Someone on a mountain bike in the woods .",
        "A biker catches air on a trail .",
        "The man is riding his bike fast on a rough path .",
    ],
}
MATCHED = {"img1.jpg": 0, "img2.jpg": 3, "img3.jpg": 4}  # which reference each prediction repeats
ONE_OF_FIVE = {key: FIVE_REFS[key][k] for key, k in MATCHED.items()}
NONE_OF_FIVE = {
    "img1.jpg": "A cat sleeps on a sofa near the window .",
    "img2.jpg": "An old man reads a newspaper in a park .",
    "img3.jpg": "Two women are cooking dinner in a kitchen .",
}
EXACT_WITH_ONE_REFERENCE = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L")


def test_prediction_equal_to_any_one_of_five_references_scores_perfectly(scorer: CaptionScorer) -> None:
    scores = scorer.score_models({"one": ONE_OF_FIVE, "none": NONE_OF_FIVE}, FIVE_REFS)
    for metric in EXACT_WITH_ONE_REFERENCE:  # clipped counts and the closest length come from the matching reference
        assert scores["one"][metric] == pytest.approx(1.0, abs=1e-6), metric
    for metric in COCO_METRICS:
        assert scores["one"][metric] > scores["none"][metric], metric


def test_adding_the_matching_reference_raises_the_scores(scorer: CaptionScorer) -> None:
    others = {key: [r for k, r in enumerate(refs) if k != MATCHED[key]] for key, refs in FIVE_REFS.items()}
    without = scorer.score(ONE_OF_FIVE, others)
    last = scorer.score(ONE_OF_FIVE, {key: [*refs, ONE_OF_FIVE[key]] for key, refs in others.items()})
    first = scorer.score(ONE_OF_FIVE, {key: [ONE_OF_FIVE[key], *refs] for key, refs in others.items()})
    for metric in (*EXACT_WITH_ONE_REFERENCE, "METEOR"):
        assert without[metric] < last[metric], metric
    for metric in EXACT_WITH_ONE_REFERENCE:  # found as the fifth reference: every reference is used, not just the first
        assert last[metric] == pytest.approx(1.0, abs=1e-6), metric
    assert last == pytest.approx(first, abs=1e-9)  # and their order does not matter


def test_multi_reference_scores_equal_pycocoevalcap_on_ptb_tokens() -> None:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    predictions = {key: f"{ONE_OF_FIVE[key]} and {NONE_OF_FIVE[key]}" for key in FIVE_REFS}  # partial overlap: no score is 0 or 1
    gts = PTBTokenizer().tokenize({key: [{"caption": r} for r in refs] for key, refs in FIVE_REFS.items()})
    res = PTBTokenizer().tokenize({key: [{"caption": text}] for key, text in predictions.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    upstream = {f"BLEU-{n}": b for n, b in enumerate(bleu, 1)}
    upstream["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    upstream["CIDEr"] = Cider().compute_score(gts, res)[0]
    report = evaluate_models({"m": predictions}, FIVE_REFS, meteor=False, normalise=False)
    assert report.results["m"] == pytest.approx(upstream, abs=1e-12)
    assert all(0 < v < 1 for k, v in upstream.items() if k != "CIDEr")


def test_tokenizer_fallback_for_a_read_only_package_matches_upstream(monkeypatch: pytest.MonkeyPatch) -> None:
    captions = {
        ("r", "1"): [{"caption": "Axial CT (arrow), left-sided mass."}, {"caption": ""}],
        ("p", "1"): [{"caption": "It's 3.5 cm; no!"}],
    }
    upstream = caption_metrics.ptb_tokenize(captions)
    monkeypatch.setattr(caption_metrics.os, "access", lambda *a: False)
    assert caption_metrics.ptb_tokenize(captions) == upstream


def test_inputs_must_cover_the_same_ids(scorer: CaptionScorer) -> None:
    with pytest.raises(ValueError, match="1 without a prediction"):
        scorer.score({"1": "x", "2": "y"}, REFS)
    with pytest.raises(ValueError, match="non-empty list"):
        scorer.score({"1": "x"}, {"1": []})
    with pytest.raises(ValueError, match="non-empty list"):
        scorer.score({"1": "x"}, {"1": "a string, not a list"})


def test_missing_java_fails_with_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(caption_metrics.shutil, "which", lambda name: None)
    with pytest.raises(JavaNotFoundError, match="default-jre-headless"):
        caption_metrics.caption_scores(SAME, REFS)


def test_detail_word_scores_by_hand() -> None:
    scores = detail_word_scores(PARTIAL, REFS, DETAIL_WORDS)
    # reference terms: {small, hyperdense, lesion, left}, {no focal lesion}, {large, hypodense, lesion, anterior}
    # predicted terms: {no focal lesion}, {no focal lesion}, {small, hyperdense, lesion, posterior}; 2 shared
    assert scores["Detail-P"] == pytest.approx(2 / 6)
    assert scores["Detail-R"] == pytest.approx(2 / 9)
    assert scores["Detail-F1"] == pytest.approx(2 * (2 / 6) * (2 / 9) / (2 / 6 + 2 / 9))
    assert scores["Acc-presence"] == pytest.approx(2 / 3)
    assert scores["Acc-side"] == 0 and scores["Acc-size"] == 0 and scores["Acc-density"] == 0
    assert scores["Attr-exact"] == pytest.approx(1 / 3)
    perfect = detail_word_scores(SAME, REFS, DETAIL_WORDS)
    assert all(v == 1.0 for v in perfect.values())
    flat = detail_word_scores({"1": "left"}, {"1": ["left right"]}, ["left", "right"])
    assert flat["Detail-P"] == 1.0 and flat["Detail-R"] == 0.5 and flat["Acc-words"] == 0.0


def test_semantic_metrics_are_skipped_or_unavailable_with_notes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    scores, notes = semantic_scores(SAME, REFS)
    assert scores == {} and notes == ["BERTScore skipped: no local model path configured", "BLEURT skipped: no local model path configured"]
    monkeypatch.setitem(sys.modules, "bert_score", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "bleurt_pytorch", None)
    scores, notes = semantic_scores(SAME, REFS, bertscore_model=tmp_path, bleurt_model=tmp_path)
    assert scores == {} and any("bert-score package is not installed" in n for n in notes) and any("bleurt-pytorch" in n for n in notes)


def test_bertscore_is_called_with_the_local_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 6}))
    calls = []

    def fake_score(cands: list[str], refs: list[list[str]], **kwargs: object) -> tuple[torch.Tensor, ...]:
        calls.append((cands, refs, kwargs))
        return torch.zeros(len(cands)), torch.zeros(len(cands)), torch.tensor([0.5, 0.7, 0.9])

    monkeypatch.setitem(sys.modules, "bert_score", types.SimpleNamespace(score=fake_score))
    scores, notes = semantic_scores(SAME, REFS, bertscore_model=tmp_path)
    assert scores == {"BERTScore": pytest.approx(0.7)}
    cands, refs, kwargs = calls[0]
    assert cands == list(SAME.values()) and refs == list(REFS.values())
    assert kwargs["model_type"] == str(tmp_path) and kwargs["num_layers"] == 6
    with pytest.raises(FileNotFoundError, match="config.json"):
        semantic_scores(SAME, REFS, bertscore_model=tmp_path / "nowhere")


def test_evaluate_models_table_and_report_files(tmp_path: Path) -> None:
    report = evaluate_models({"BLIP-2": PARTIAL, "MSMedCap": SAME}, REFS, detail_vocabulary=DETAIL_WORDS, meteor=False)
    assert "METEOR skipped (meteor=False)" in report.notes
    assert report.results["MSMedCap"]["Attr-exact"] == 1.0 and "METEOR" not in report.results["BLIP-2"]
    md_path, json_path = report.write(tmp_path / "out", name="synthetic", title="Synthetic benchmark", metadata={"seed": 0})
    doc = json.loads(json_path.read_text())
    assert doc["results"] == report.results and doc["metadata"] == {"seed": 0} and doc["metrics"][0] == "BLEU-1"
    markdown = md_path.read_text()
    assert markdown.startswith("# Synthetic benchmark\n") and "| MSMedCap | **1.000** |" in markdown and "- BLEURT skipped" in markdown


def test_comparison_table_bolds_the_best_per_column() -> None:
    table = comparison_table(
        {"A": {"BLEU-1": 0.5, "CIDEr": 1.25, "Extra": 3.0}, "B": {"CIDEr": 1.25, "BLEU-1": 0.25}, "C": {"BLEU-1": 0.1}}
    )
    assert table.splitlines() == [
        "| Model | BLEU-1 | CIDEr | Extra |",
        "|---|---:|---:|---:|",
        "| A | **0.500** | **1.250** | 3.000 |",
        "| B | 0.250 | **1.250** | – |",
        "| C | 0.100 | – | – |",
    ]
    assert "**" not in comparison_table({"only": {"BLEU-1": 0.5}})
    with pytest.raises(ValueError):
        write_report({}, Path("unused"))
