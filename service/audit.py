"""The audit trail: one entry point, written in the caller's transaction.

Callers pass the session that carries the state change the event describes, so the
event and the change commit, or roll back, together.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from service.schema import AuditEvent


class Action(enum.StrEnum):
    ASSOCIATION_ACCEPTED = "association.accepted"
    ASSOCIATION_REJECTED = "association.rejected"
    ASSOCIATION_ENDED = "association.ended"
    ASSOCIATION_LOST = "association.lost"
    STUDY_RECEIVING = "study.receiving"
    INSTANCE_REPLACED = "instance.replaced"
    INSTANCE_FAILED = "instance.failed"
    STUDY_FORCE_REQUESTED = "study.force_requested"
    STUDY_VERSION_CREATED = "study.version_created"
    STUDY_NOTHING_TO_CAPTION = "study.nothing_new_to_caption"
    JOB_CREATED = "job.created"
    JOB_ENQUEUED = "job.enqueued"
    JOB_REENQUEUED = "job.reenqueued"
    JOB_SUPERSEDED = "job.superseded"
    JOB_STARTED = "job.started"
    JOB_SUCCEEDED = "job.succeeded"
    JOB_FAILED = "job.failed"
    JOB_SKIPPED = "job.skipped"
    JOB_RETRY_SCHEDULED = "job.retry_scheduled"
    JOB_RETRY_REQUESTED = "job.retry_requested"
    SERIES_SKIPPED = "series.skipped"  # a routing rule (or no rule) left the series uncaptioned
    SR_WRITTEN = "sr.written"
    OUTPUT_BUILT = "output.built"
    DISPATCH_QUEUED = "dispatch.queued"
    DISPATCH_ENQUEUED = "dispatch.enqueued"
    DISPATCH_DELIVERED = "dispatch.delivered"
    DISPATCH_RETRY_SCHEDULED = "dispatch.retry_scheduled"
    DISPATCH_FAILED = "dispatch.failed"
    DISPATCH_SKIPPED = "dispatch.skipped"
    DISPATCH_RESEND_REQUESTED = "dispatch.resend_requested"
    USER_ADDED = "user.added"
    USER_DISABLED = "user.disabled"
    USER_ENABLED = "user.enabled"
    USER_PASSWORD_RESET = "user.password_reset"
    LOGIN_SUCCEEDED = "auth.login"
    LOGIN_FAILED = "auth.login_failed"
    LOGIN_THROTTLED = "auth.login_throttled"
    LOGOUT = "auth.logout"
    ACCESS_DENIED = "auth.access_denied"
    WORKLIST_VIEWED = "worklist.viewed"
    STUDY_VIEWED = "study.viewed"
    DRAFT_APPROVED = "draft.approved"
    DRAFT_REJECTED = "draft.rejected"
    REVIEW_CONFLICT = "draft.review_conflict"
    AUDIT_SEARCHED = "audit.searched"
    AUDIT_EXPORTED = "audit.exported"
    FEEDBACK_EXPORTED = "feedback.exported"
    LISTENER_STARTED = "listener.started"
    LISTENER_STOPPED = "listener.stopped"
    DATABASE_UPGRADED = "database.upgraded"
    # DICOMweb in (STOW-RS): service/dicomweb_clients.py, service/stow_requests.py
    DICOMWEB_CLIENT_ADDED = "dicomweb.client_added"
    DICOMWEB_CLIENT_REMOVED = "dicomweb.client_removed"
    STOW_REFUSED = "stow.refused"
    STOW_STARTED = "stow.started"
    STOW_ENDED = "stow.ended"


def dicom_actor(calling_ae: str, address: str) -> str:
    return f"dicom:{calling_ae.strip()}@{address}"


def dicomweb_actor(client: str, address: str) -> str:
    return f"dicomweb:{client}@{address}"


SYSTEM_ASSEMBLER = "system:assembler"
SYSTEM_LISTENER = "system:listener"


def worker_actor(hostname: str) -> str:
    return f"worker:{hostname}"


def cli_actor(user: str) -> str:
    return f"cli:{user}"


def web_actor(username: str) -> str:
    return f"user:{username}"


def record(
    session: Session,
    at: datetime,
    actor: str,
    action: Action,
    object_type: str,
    object_id: str | int,
    *,
    study_uid: str | None = None,
    **details: Any,
) -> AuditEvent:
    event = AuditEvent(
        at=at,
        actor=actor,
        action=action.value,
        object_type=object_type,
        object_id=str(object_id),
        study_uid=study_uid,
        details=details,
    )
    session.add(event)
    return event
