"""Migration 0004's views on both backends: exact numbers on a known history, the same numbers from
service/audit_queries.py, a working downgrade, and every SQL example of docs/audit.md run for real."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

import migrations
from service import audit
from service import audit_queries as aq
from service.audit import Action
from tests.migrations.audit_data import MODEL_A, MODEL_B, T0, populate, study_uid

VIEWS = {"v_audit_trail", "v_drafts", "v_turnaround", "v_turnaround_by_model", "v_model_quality", "v_failed_work"}
DOC = Path(__file__).resolve().parents[2] / "docs" / "audit.md"


def view_names(db) -> set[str]:
    return set(inspect(db.engine).get_view_names())


def rows(db, sql: str) -> list[dict]:
    with db.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(sql))]


def test_the_views_exist_and_downgrade_removes_them(db):
    assert view_names(db) == VIEWS
    migrations.downgrade(db.engine, "0003")
    assert view_names(db) == set()
    assert "audit_events" in db.table_names()
    db.upgrade()
    assert view_names(db) == VIEWS


def test_turnaround_per_study_counts_the_newest_draft(db):
    populate(db)
    got = {r["accession_number"]: r for r in rows(db, "SELECT * FROM v_turnaround")}
    assert set(got) == {"A1001", "A1002", "A1003", "A1004", "A1005"}, "A1006's job failed: no draft, no row"
    assert [(got[a]["draft_seconds"], got[a]["approval_seconds"], got[a]["total_seconds"]) for a in sorted(got)] == [
        (60, 600, 660),
        (120, 1200, 1320),
        (180, None, None),
        (240, 60, 300),
        (90, None, None),
    ]
    assert (got["A1004"]["study_version"], got["A1004"]["model_version"]) == (2, "2.0"), (
        "the second version's draft, not the superseded one"
    )
    assert got["A1003"]["approved_at"] is None, "rejected is not approved"


def test_turnaround_by_model(db):
    populate(db)
    got = {r["model_version"]: r for r in rows(db, "SELECT * FROM v_turnaround_by_model")}
    a, b = got["1.0"], got["2.0"]
    assert (a["weights_sha256"], a["studies"], a["approved"]) == (MODEL_A[2], 3, 2)
    # draft seconds 60, 120, 180: median 120, p90 180; approval 600, 1200: nearest-rank median is the lower, 600
    assert [
        a[k]
        for k in (
            "draft_median_seconds",
            "draft_p90_seconds",
            "approval_median_seconds",
            "approval_p90_seconds",
            "total_median_seconds",
            "total_p90_seconds",
        )
    ] == [120, 180, 600, 1200, 660, 1320]
    assert (b["studies"], b["approved"], b["draft_median_seconds"], b["draft_p90_seconds"], b["total_median_seconds"]) == (
        2,
        1,
        90,
        240,
        300,
    )
    assert [tuple(r.as_dict().values()) for r in aq.turnaround_by_model(db)] == [tuple(got[v].values()) for v in ("1.0", "2.0")]


def test_model_quality(db):
    populate(db)
    got = {r["model_version"]: r for r in rows(db, "SELECT * FROM v_model_quality")}
    a, b = got["1.0"], got["2.0"]
    # model 1.0: four drafts (one superseded, undecided); approved as is, approved with 20 of 100 characters changed, rejected
    assert [a[k] for k in ("drafts", "reviewed", "approved", "approved_unchanged", "rejected", "median_edit_distance")] == [
        4,
        3,
        2,
        1,
        1,
        0,
    ]
    assert a["approved_unchanged_rate"] == pytest.approx(1 / 3) and a["mean_edit_distance"] == pytest.approx(10)
    assert a["normalised_edit_distance"] == pytest.approx(0.1)  # mean of 0/100 and 20/100
    assert (b["weights_sha256"], b["drafts"], b["reviewed"], b["approved_unchanged_rate"], b["median_edit_distance"]) == (
        MODEL_B[2],
        2,
        1,
        0,
        5,
    )
    assert b["normalised_edit_distance"] == pytest.approx(5 / 50)
    assert [tuple(r.as_dict().values()) for r in aq.model_quality(db)] == [tuple(got[v].values()) for v in ("1.0", "2.0")]


def test_failed_work_and_the_audit_trail(db):
    ids = populate(db)
    failed = rows(db, "SELECT * FROM v_failed_work ORDER BY kind")
    assert [(f["kind"], f["job_id"], f["dispatch_id"], f["accession_number"], f["sr_kind"], f["destination"]) for f in failed] == [
        ("dispatch", None, ids["failed_dispatch"], "A1001", "verified", "PACS@10.0.0.9:104"),
        ("job", ids["failed_job"], None, "A1006", None, None),
    ]
    assert [(f.kind, f.failed_at) for f in aq.failed_work(db)] == [
        ("job", T0 + timedelta(seconds=5030)),
        ("dispatch", T0 + timedelta(seconds=700)),
    ]
    trail = rows(db, "SELECT * FROM v_audit_trail WHERE accession_number = 'A1002' ORDER BY id")
    assert [r["action"] for r in trail] == ["study.receiving", "job.created", "job.succeeded", "sr.written", "draft.approved"]
    assert {r["patient_id"] for r in trail} == {"PAT002"}


def test_time_windows_select_studies_and_drafts(db):
    populate(db)
    # A1001 and A1002 were received in the first 1000 s; A1003 (rejected) at 2000 s.
    first = aq.turnaround_by_model(db, since=T0, until=T0 + timedelta(seconds=1001))
    assert [(t.model_version, t.studies, t.approved, t.draft_median_seconds, t.total_p90_seconds) for t in first] == [
        ("1.0", 2, 2, 60, 1320)
    ]
    later = aq.model_quality(db, since=T0 + timedelta(seconds=2000), until=T0 + timedelta(days=1))
    assert [(q.model_version, q.drafts, q.reviewed, q.rejected, q.approved_unchanged_rate) for q in later] == [
        ("1.0", 2, 1, 1, 0.0),
        ("2.0", 2, 1, 0, 0.0),
    ]
    studies = aq.study_turnaround(db, since=T0 + timedelta(seconds=2500))
    assert [s.accession_number for s in studies] == ["A1005", "A1004"]


def doc_blocks() -> list[tuple[str, str]]:
    """(dialects, sql) per fenced block of docs/audit.md whose info string starts with sql."""
    found = re.findall(r"^```sql([^\n]*)\n(.*?)^```$", DOC.read_text(), flags=re.M | re.S)
    return [(info.strip() or "both", body) for info, body in found]


def test_every_view_is_documented():
    doc = DOC.read_text()
    for view in VIEWS:
        assert f"## `{view}`" in doc


def test_the_sql_in_docs_audit_md_runs_and_finds_the_history(db):
    populate(db)
    with db.session() as s:  # for the examples relative to now
        audit.record(
            s, datetime.now(UTC) - timedelta(minutes=5), "user:smith", Action.STUDY_VIEWED, "sr_document", "x", study_uid=study_uid("A1001")
        )
    dialect = db.engine.dialect.name
    blocks = doc_blocks()
    assert len(blocks) >= 15
    ran = 0
    for dialects, sql in blocks:
        assert dialects in ("both", "postgresql", "sqlite"), f"unknown block label {dialects!r}"
        if dialects not in ("both", dialect):
            continue
        with db.engine.connect() as conn:
            found = conn.execute(text(sql.strip().rstrip(";"))).all()
        assert found, f"no rows from:\n{sql}"
        ran += 1
    assert ran >= len([b for b in blocks if b[0] == "both"]) + 1
