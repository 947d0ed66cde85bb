"""The audit trail: one entry point, written in the caller's transaction.

Callers pass the session that carries the state change the event describes, so the
event and the change commit, or roll back, together. When the session's database copies the
audit trail to an ATNA audit repository (``Database(audit_copy=True)``, MEDCAP_AUDIT_SYSLOG_URL),
the events of ``ATNA_ACTIONS`` also get an ``audit_outbox`` row in that same transaction, which
service/syslog_sender.py turns into a DICOM audit message (service/atna.py) and sends.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from service.schema import AuditCopy, AuditEvent


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


# The events copied to the audit repository, each one DICOM PS3.15 A.5.3 message (service/atna.py).
ATNA_ACTIONS = frozenset(
    {
        Action.LISTENER_STARTED,  # Application Activity: start
        Action.LISTENER_STOPPED,  # Application Activity: stop
        Action.ASSOCIATION_REJECTED,  # Security Alert: node authentication failed
        Action.ASSOCIATION_ENDED,  # DICOM Instances Transferred: received (when it brought instances)
        Action.DISPATCH_DELIVERED,  # DICOM Instances Transferred: sent
        Action.STUDY_VIEWED,  # DICOM Instances Accessed: the review page and its key images
        Action.FEEDBACK_EXPORTED,  # Export
        Action.AUDIT_EXPORTED,  # Export (CSV)
        Action.AUDIT_SEARCHED,  # Query
        Action.LOGIN_SUCCEEDED,  # User Authentication: login
        Action.LOGIN_FAILED,  # User Authentication: login, failed
        Action.LOGIN_THROTTLED,  # User Authentication: login, refused
        Action.LOGOUT,  # User Authentication: logout
    }
)
# Session.info key set by service.database.Database(audit_copy=True).
AUDIT_COPY = "medcap_audit_copy"


def copied(action: Action, details: dict[str, Any]) -> bool:
    """Whether an event gets an ATNA copy: an association that transferred nothing has no instances to report."""
    return action in ATNA_ACTIONS and not (action is Action.ASSOCIATION_ENDED and not details.get("received"))


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
    if session.info.get(AUDIT_COPY) and copied(action, details):
        session.add(AuditCopy(event=event, attempts=0, next_attempt_at=at))
    return event
