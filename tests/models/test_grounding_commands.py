"""``medcap caption`` and ``medcap evaluate`` ground drafts on the shared series' headers, with a small
demo model trained here (it describes synthetic slices, so on real series it contradicts their headers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicom_io.header_facts import HeaderFacts
from models.demo import DEMO_MODEL_NAME, build_demo_model
from models.grounding import contradictions, sentences
from models.synthetic import generate_dataset
from service.cli import main
from tests.conftest import SHARED_DATA, shared_data

HEADINGS = {
    "ct-head-ge": "CT head, axial:",
    "ct-phantom-philips": "CT brain, axial, without contrast:",
    "mr-t1-brain-uih": "MR head, sagittal:",
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("demo") / "demo", steps=40, train_images=120, progress=False)


@pytest.fixture(autouse=True)
def _no_medcap_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDCAP_MODEL", raising=False)
    monkeypatch.setenv("MEDCAP_TORCH_THREADS", "1")


def caption_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["caption", str(shared_data()), "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_caption_json_grounds_every_shared_series_on_its_header(demo, capsys):
    report = caption_json(capsys, "--model", str(demo))
    assert report["grounding"] is True and len(report["series"]) == 3
    removed_in_all = 0
    for series in report["series"]:
        facts = HeaderFacts.from_dict(series["header_facts"])
        name = next(n for n in HEADINGS if (SHARED_DATA / n).is_dir() and series["study_uid"] in _study_uids(n))
        assert series["draft"].startswith(HEADINGS[name])
        body = series["draft"][len(HEADINGS[name]) :].strip()
        kept = [] if body.startswith("(") else sentences([body])
        assert all(contradictions(s, facts) == [] for s in kept)  # nothing left contradicts the header
        removed = [r["sentence"] for r in series["removed"]]
        assert all(r["reasons"] for r in series["removed"])
        assert sorted(kept + removed) == sorted(sentences([series["model_draft"]]))  # every sentence kept or removed, none lost
        removed_in_all += len(removed)
    assert removed_in_all > 0  # a model of synthetic slices does contradict these headers


def test_caption_without_grounding_prints_the_model_text(demo, capsys):
    report = caption_json(capsys, "--model", str(demo), "--no-grounding")
    assert report["grounding"] is False
    assert all(s["draft"] == s["model_draft"] and s["removed"] == [] for s in report["series"])
    assert main(["caption", str(shared_data("ct-head-ge")), "--model", str(demo)]) == 0
    text = capsys.readouterr().out
    assert "CT head, axial:" in text and "removed (contradicts the header)" in text


def test_evaluate_reports_the_contradiction_rate_of_the_shared_series_with_and_without_grounding(demo, capsys, tmp_path):
    assert main(["evaluate", "--model", str(demo), "--dicom", str(shared_data()), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Contradiction rate without grounding" in out and f"| {DEMO_MODEL_NAME} | 3 |" in out
    written = json.loads((tmp_path / "contradictions.json").read_text())
    (row,) = written["models"].values()
    assert row["series"] == 3
    assert row["grounded"]["contradicting"] == 0
    details = next(iter(written["details"].values()))
    recount = sum(
        1 for d in details for s in sentences([d["draft_without_grounding"]]) if contradictions(s, HeaderFacts.from_dict(d["header_facts"]))
    )
    assert row["without_grounding"]["contradicting"] == recount == row["removed"] > 0


def test_evaluate_scores_a_table_with_header_facts_as_written_and_grounded(demo, capsys, tmp_path):
    data = generate_dataset(tmp_path / "syn", 0, 0, 12, size=64, seed=3)
    assert main(["evaluate", "--model", str(demo), "--data", str(data), "--out", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out
    assert f"| {DEMO_MODEL_NAME} |" in out and f"| {DEMO_MODEL_NAME} (grounded) |" in out and "Contradiction rate with grounding" in out
    results = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]
    assert set(results) == {DEMO_MODEL_NAME, f"{DEMO_MODEL_NAME} (grounded)"}
    grounding = json.loads((tmp_path / "eval" / "contradictions.json").read_text())
    assert grounding["unit"] == "images" and grounding["models"][DEMO_MODEL_NAME]["grounded"]["contradicting"] == 0


def test_evaluate_needs_data_or_dicom(demo, capsys):
    assert main(["evaluate", "--model", str(demo)]) != 0
    assert "give --data SPEC" in capsys.readouterr().err


def _study_uids(name: str) -> set[str]:
    import pydicom

    first = next(p for p in sorted(shared_data(name).iterdir()) if p.is_file())
    return {str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)}
