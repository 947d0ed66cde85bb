"""The outcome row of a draft SR (``draft_outcomes``, migration 0008): the draft, its study, model,
review and turnaround in one row, which the audit views and the admins' statistics read.

Written in the same transaction as what it describes: by workers/drafting.py with the draft SR,
by service/review.py with the decision. Every field is copied from rows that never change once
written (a study's accession and patient, a version's number, a draft's model, a review, a
username), so a row is rewritten only when its draft is decided, and ``latest`` (the study's
newest draft) changes only when the study gets a newer draft.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session

# Per dialect, as migration 0004's views compute them (so the stored seconds equal the old view's).
_SECONDS = {
    "postgresql": "CAST(ROUND(EXTRACT(EPOCH FROM ({end}) - ({start})), 3) AS DOUBLE PRECISION)",
    "sqlite": "ROUND((julianday({end}) - julianday({start})) * 86400.0, 3)",
}

# Migration 0004's v_drafts for one draft SR (its model is that of its first series' draft), with v_turnaround's seconds.
_INSERT = """
    INSERT INTO draft_outcomes (draft_sr_id, draft_sr_uid, study_id, study_uid, accession_number, patient_id, patient_name,
                                study_version, model_name, model_version, weights_sha256, received_at, drafted_at, decision,
                                decided_at, reviewer, edited, edit_distance, draft_characters, verified_sr_uid,
                                draft_seconds, approval_seconds, total_seconds, latest)
    SELECT sr.id, sr.sop_instance_uid, st.id, st.study_uid, st.accession_number, st.patient_id, st.patient_name, sv.number,
           d.model_name, d.model_version, d.weights_sha256, st.first_received_at, sr.created_at, r.decision,
           r.decided_at, u.username, r.edited, r.edit_distance, r.draft_characters, v.sop_instance_uid,
           {draft}, CASE WHEN r.decision = 'approved' THEN {approval} END, CASE WHEN r.decision = 'approved' THEN {total} END,
           {false}
    FROM sr_documents sr
    JOIN studies st ON st.id = sr.study_id
    JOIN study_versions sv ON sv.id = sr.study_version_id
    JOIN drafts d ON d.sr_document_id = sr.id
    LEFT JOIN reviews r ON r.draft_sr_id = sr.id
    LEFT JOIN users u ON u.id = r.reviewer_id
    LEFT JOIN sr_documents v ON v.id = r.verified_sr_id
    WHERE sr.id = :id AND sr.kind = 'draft'
      AND NOT EXISTS (SELECT 1 FROM drafts d0 WHERE d0.sr_document_id = sr.id AND d0.id < d.id)"""

_LATEST = text("""
    UPDATE draft_outcomes SET latest = NOT EXISTS (
        SELECT 1 FROM draft_outcomes b WHERE b.study_id = draft_outcomes.study_id AND b.draft_sr_id > draft_outcomes.draft_sr_id)
    WHERE study_id = :study_id""")


def _insert(dialect: str) -> str:
    seconds = _SECONDS[dialect]
    return _INSERT.format(
        draft=seconds.format(start="st.first_received_at", end="sr.created_at"),
        approval=seconds.format(start="sr.created_at", end="r.decided_at"),
        total=seconds.format(start="st.first_received_at", end="r.decided_at"),
        false="false" if dialect == "postgresql" else "0",
    )


_INSERTS = {dialect: text(_insert(dialect)) for dialect in _SECONDS}


def refresh(s: Session, draft_sr_id: int) -> None:
    """(Re)write the outcome row of one draft SR from its rows as ``s`` sees them (pending ones flushed),
    and which of its study's drafts is the newest."""
    s.flush()
    dialect = s.get_bind().dialect.name
    study_id = s.execute(text("SELECT study_id FROM sr_documents WHERE id = :id"), {"id": draft_sr_id}).scalar_one()
    if dialect == "postgresql":
        # Two drafts of one study committed at once would each miss the other's row when setting
        # ``latest``; this per-study lock orders them (SQLite has one writer at a time anyway).
        s.execute(text("SELECT pg_advisory_xact_lock(8008, CAST(:study_id % 2147483647 AS INTEGER))"), {"study_id": study_id})
    s.execute(text("DELETE FROM draft_outcomes WHERE draft_sr_id = :id"), {"id": draft_sr_id})
    s.execute(_INSERTS[dialect], {"id": draft_sr_id})
    s.execute(_LATEST, {"study_id": study_id})
