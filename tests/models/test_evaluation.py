"""``evaluate_checkpoints``: captioners of different families side by side, SBG once per candidate count."""

from __future__ import annotations

import json

from models import checkpoint
from models.cnn_lstm import tiny_cnn_lstm
from models.datasets import read_table
from models.evaluation import evaluate_checkpoints
from models.generation import preset
from models.sbg import tiny_sbg
from models.synthetic import generate_dataset


def test_families_side_by_side_and_sbg_per_candidate_count(tmp_path):
    records = [r for r in read_table(generate_dataset(tmp_path / "syn", 12, 0, 4, size=64, seed=2)) if r.split == "test"]
    captions = [r.caption for r in read_table(tmp_path / "syn" / "captions.jsonl")]
    sbg, sbg_text = tiny_sbg(captions, image_size=64)
    lstm, vocab = tiny_cnn_lstm(captions, image_size=64)
    checkpoint.save(sbg, sbg_text, tmp_path / "sbg", checkpoint.Provenance())
    checkpoint.save(lstm, vocab, tmp_path / "lstm", checkpoint.Provenance())
    report = evaluate_checkpoints(
        [tmp_path / "sbg", tmp_path / "lstm"],
        records,
        generation=preset("fast"),
        device="cpu",
        out_dir=tmp_path / "eval",
        candidates=(1, 2),
        progress=False,
    )
    rows = ["SBG (top-1)", "SBG (top-2)", "CNN-LSTM"]  # the LSTM does not rerank: one row
    # the synthetic rows' attributes are header facts: each model is also scored grounded
    assert list(report.results) == rows + [f"{r} (grounded)" for r in rows]
    assert report.grounding is not None and list(report.grounding.without) == rows
    assert all("BLEU-4" in row and "CIDEr" in row for row in report.results.values())
    written = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert "SBG (top-2)" in json.dumps(written)
    predictions = json.loads((tmp_path / "eval" / "predictions.json").read_text())["predictions"]
    assert set(predictions) == {*rows, *(f"{r} (grounded)" for r in rows)} and all(len(p) == 4 for p in predictions.values())
    table = report.table()
    assert "| SBG (top-2) |" in table and "| CNN-LSTM |" in table
