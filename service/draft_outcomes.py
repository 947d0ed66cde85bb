"""The outcome row of a draft SR (``draft_outcomes``, migration 0008): the draft, its study, model
and review in one row, which the audit views and the admins' statistics read.

Written in the same transaction as what it describes: by workers/drafting.py with the draft SR,
by service/review.py with the decision. Every field is copied from rows that never change once
written (a study's accession and patient, a version's number, a draft's model, a review, a
username), so the row is rewritten only when a draft is decided.
"""

from __future__ import annotations

from sqlalchemy import delete, text
from sqlalchemy.orm import Session

from service.schema import DraftOutcome

# Migration 0004's v_drafts for one draft SR: the model is that of its first series' draft.
_OUTCOME = text("""
    INSERT INTO draft_outcomes (draft_sr_id, draft_sr_uid, study_id, study_uid, accession_number, patient_id, patient_name,
                                study_version, model_name, model_version, weights_sha256, received_at, drafted_at, decision,
                                decided_at, reviewer, edited, edit_distance, draft_characters, verified_sr_uid)
    SELECT sr.id, sr.sop_instance_uid, st.id, st.study_uid, st.accession_number, st.patient_id, st.patient_name, sv.number,
           d.model_name, d.model_version, d.weights_sha256, st.first_received_at, sr.created_at, r.decision,
           r.decided_at, u.username, r.edited, r.edit_distance, r.draft_characters, v.sop_instance_uid
    FROM sr_documents sr
    JOIN studies st ON st.id = sr.study_id
    JOIN study_versions sv ON sv.id = sr.study_version_id
    JOIN drafts d ON d.sr_document_id = sr.id
    LEFT JOIN reviews r ON r.draft_sr_id = sr.id
    LEFT JOIN users u ON u.id = r.reviewer_id
    LEFT JOIN sr_documents v ON v.id = r.verified_sr_id
    WHERE sr.id = :id AND sr.kind = 'draft'
      AND NOT EXISTS (SELECT 1 FROM drafts d0 WHERE d0.sr_document_id = sr.id AND d0.id < d.id)""")


def refresh(s: Session, draft_sr_id: int) -> None:
    """(Re)write the outcome row of one draft SR from its rows as ``s`` sees them (pending ones flushed)."""
    s.flush()
    s.execute(delete(DraftOutcome).where(DraftOutcome.draft_sr_id == draft_sr_id))
    s.execute(_OUTCOME, {"id": draft_sr_id})
