"""Migration 0006 on both backends: dispatches in the old shape (an SR each) carried over to outputs,
with ids, statuses and attempts kept, v_failed_work unchanged in meaning, and a downgrade back."""

from __future__ import annotations

import pytest
from sqlalchemy import text

import migrations

OUTPUTS = migrations.revision_module("0006")
BEFORE = OUTPUTS.down_revision  # the old shape


def run(db, sql: str, **params: object) -> list[dict]:
    with db.engine.begin() as conn:
        result = conn.execute(text(sql), params)
        return [dict(r._mapping) for r in result] if result.returns_rows else []


def old_shape(db) -> None:
    """Two SRs: a draft sent to two PACS (one failed after two attempts), a verified one sent to one; a third never sent."""
    migrations.downgrade(db.engine, BEFORE)
    t = "2026-03-01 12:00:00+00:00"
    run(db, "INSERT INTO studies (id, study_uid, accession_number, first_received_at) VALUES (1, '1.2.3', 'A1', :t)", t=t)
    run(
        db,
        """INSERT INTO study_versions (id, study_id, number, created_at, trigger, instance_count, captionable_count)
           VALUES (1, 1, 1, :t, 'stable', 3, 3)""",
        t=t,
    )
    run(db, "INSERT INTO jobs (id, study_version_id, status, created_at, attempts) VALUES (1, 1, 'succeeded', :t, 1)", t=t)
    for sr_id, kind, job in ((1, "draft", 1), (2, "verified", None), (3, "draft", None)):
        run(
            db,
            """INSERT INTO sr_documents (id, kind, idempotency_key, study_id, study_version_id, job_id, sop_instance_uid, series_uid,
                                         completion_flag, verification_flag, path, sha256, created_at, created_by)
               VALUES (:id, :kind, :key, 1, 1, :job, :uid, '2.25.9', 'PARTIAL', 'UNVERIFIED', :path, :sha, :t, 'worker:a')""",
            id=sr_id,
            kind=kind,
            key=f"{kind}:{sr_id}",
            job=job,
            uid=f"2.25.{sr_id}",
            path=f"/data/reports/{sr_id}.dcm",
            sha=str(sr_id) * 64,
            t=t,
        )
    for dispatch_id, sr_id, destination, status, attempts in (
        (7, 1, "PACS@10.0.0.9:104", "delivered", 1),
        (8, 1, "BACKUP@10.0.0.10:104", "failed", 2),
        (9, 2, "PACS@10.0.0.9:104", "retrying", 1),
    ):
        run(
            db,
            """INSERT INTO dispatches (id, sr_document_id, destination, status, attempts, created_at, error)
               VALUES (:id, :sr, :dest, :status, :attempts, :t, :error)""",
            id=dispatch_id,
            sr=sr_id,
            dest=destination,
            status=status,
            attempts=attempts,
            t=t,
            error="refused" if status == "failed" else None,
        )
    run(
        db,
        """INSERT INTO dispatch_attempts (dispatch_id, number, started_at, finished_at, outcome, error, instances, worker)
           VALUES (8, 2, :t, :t, 'refused', 'refused', '[]', 'worker:a')""",
        t=t,
    )


FAILED = "SELECT kind, dispatch_id, study_uid, sr_uid, sr_kind, destination, attempts, error FROM v_failed_work ORDER BY kind"


def test_dispatches_are_carried_over_to_outputs(db):
    old_shape(db)
    failed_before = run(db, FAILED)
    db.upgrade()
    assert db.is_current()
    outputs = run(db, "SELECT id, report_id, kind, media_type, path, sha256 FROM outputs ORDER BY report_id")
    assert [(o["report_id"], o["kind"], o["media_type"], o["path"], o["sha256"]) for o in outputs] == [
        (1, "dicom-sr", "application/dicom", "/data/reports/1.dcm", "1" * 64),
        (2, "dicom-sr", "application/dicom", "/data/reports/2.dcm", "2" * 64),
    ], "an output for each SR with a dispatch; none for the SR never sent"
    output_of = {o["report_id"]: o["id"] for o in outputs}
    dispatches = run(db, "SELECT id, output_id, destination, status, attempts FROM dispatches ORDER BY id")
    assert [(d["id"], d["output_id"], d["destination"], d["status"], d["attempts"]) for d in dispatches] == [
        (7, output_of[1], "PACS@10.0.0.9:104", "delivered", 1),
        (8, output_of[1], "BACKUP@10.0.0.10:104", "failed", 2),
        (9, output_of[2], "PACS@10.0.0.9:104", "retrying", 1),
    ]
    assert run(db, "SELECT dispatch_id FROM dispatch_attempts") == [{"dispatch_id": 8}]
    assert (
        run(db, FAILED)
        == failed_before
        == [
            {
                "kind": "dispatch",
                "dispatch_id": 8,
                "study_uid": "1.2.3",
                "sr_uid": "2.25.1",
                "sr_kind": "draft",
                "destination": "BACKUP@10.0.0.10:104",
                "attempts": 2,
                "error": "refused",
            }
        ]
    )
    # Back down: every dispatch points at its SR again.
    migrations.downgrade(db.engine, BEFORE)
    assert [(d["id"], d["sr_document_id"]) for d in run(db, "SELECT id, sr_document_id FROM dispatches ORDER BY id")] == [
        (7, 1),
        (8, 1),
        (9, 2),
    ]
    assert run(db, FAILED) == failed_before
    assert "outputs" not in db.table_names()


def test_a_downgrade_is_refused_while_outputs_of_another_kind_exist(db):
    old_shape(db)
    db.upgrade()
    run(
        db,
        """INSERT INTO outputs (report_id, kind, media_type, path, sha256, created_at)
           VALUES (3, 'hl7-oru', 'x-application/hl7-v2+er7', '/data/outputs/3.hl7', :sha, '2026-03-01 12:00:00+00:00')""",
        sha="3" * 64,
    )
    migrations.downgrade(db.engine, OUTPUTS.revision)  # the later revisions first (SQLite commits each DDL step)
    with pytest.raises(RuntimeError, match="outputs of kind hl7-oru exist"):
        migrations.downgrade(db.engine, BEFORE)
    assert migrations.current_revision(db.engine) == OUTPUTS.revision, "nothing was changed"
    assert len(run(db, "SELECT id FROM outputs")) == 3 and len(run(db, "SELECT output_id FROM dispatches")) == 3
