"""Minimal valid rows of the pipeline's records, for tests that start mid-way (a lifecycle, an
output kind) rather than from a received study. Each builder adds, flushes and returns the row;
keyword arguments override any column."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from service.schema import SRDocument, Study, StudyVersion


def study(s: Session, now: datetime, study_uid: str, **values: Any) -> Study:
    row = Study(**({"study_uid": study_uid, "first_received_at": now} | values))
    s.add(row)
    s.flush()
    return row


def version(s: Session, now: datetime, of: Study, number: int = 1, **values: Any) -> StudyVersion:
    defaults = {"study_id": of.id, "number": number, "created_at": now, "trigger": "stable", "instance_count": 1, "captionable_count": 1}
    row = StudyVersion(**(defaults | values))
    s.add(row)
    s.flush()
    return row


def draft_sr(s: Session, now: datetime, of: StudyVersion, **values: Any) -> SRDocument:
    """A draft SR's row; ``path`` and ``sha256`` name no real file unless given."""
    defaults = {
        "kind": "draft",
        "idempotency_key": f"draft:{of.id}",
        "study_id": of.study_id,
        "study_version_id": of.id,
        "sop_instance_uid": f"2.25.{of.study_id}{of.number}",
        "series_uid": "2.25.9",
        "completion_flag": "PARTIAL",
        "verification_flag": "UNVERIFIED",
        "path": "/nowhere",
        "sha256": "0" * 64,
        "created_at": now,
        "created_by": "test",
    }
    row = SRDocument(**(defaults | values))
    s.add(row)
    s.flush()
    return row
