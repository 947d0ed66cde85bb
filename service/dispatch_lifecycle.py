"""The life of a dispatch (one output of a report to one destination): every status change of a ``dispatches`` row
happens here, and nowhere else.

::

    (created) ─▶ pending ──publish──▶ enqueued ──claim──▶ sending ──deliver──▶ delivered
                   │  ▲                   ▲                 │ │                    │
                   │  └──resend── failed ◀┼──── fail ───────┘ │                    │
                   └────claim─────────────┘                   └─retry─▶ retrying ──publish / claim (when due)
    sending ──take over (its worker went quiet)──▶ sending        delivered ──resend (forced)──▶ pending

Each transition is one conditional UPDATE from the statuses :data:`TRANSITIONS` allows, with its
audit event in the same transaction. "Which dispatches are due" is :func:`due`, the one query
both the assembler and a caption worker (for its new SR) publish from.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.orm import Session

from service import audit, outputs
from service import job_lifecycle as jobs
from service.audit import Action
from service.clock import Clock
from service.database import Database
from service.outputs import OutputKinds
from service.schema import Dispatch, DispatchStatus, Output, SRDocument, SRKind, Study

LOG = logging.getLogger(__name__)


class DispatchEvent(enum.StrEnum):
    PUBLISH = "publish"
    REPUBLISH = "republish"  # its message or its worker went quiet
    CLAIM = "claim"
    TAKE_OVER = "take_over"  # claimed again: the last worker went quiet mid-send
    DELIVER = "deliver"
    RETRY = "retry"  # a transient failure: sent again after a backoff
    FAIL = "fail"  # refused, or out of attempts
    RESEND = "resend"  # an operator sends a failed one again
    FORCE_RESEND = "force_resend"  # an operator sends a delivered one again (to a PACS that lost it)


P, E, S, RT = DispatchStatus.PENDING, DispatchStatus.ENQUEUED, DispatchStatus.SENDING, DispatchStatus.RETRYING
#: event -> (statuses it may leave, status it leads to; None: unchanged)
TRANSITIONS: dict[DispatchEvent, tuple[frozenset[DispatchStatus], DispatchStatus | None]] = {
    DispatchEvent.PUBLISH: (frozenset({P, RT}), E),
    DispatchEvent.REPUBLISH: (frozenset({E, S}), None),
    DispatchEvent.CLAIM: (frozenset({P, E, RT}), S),
    DispatchEvent.TAKE_OVER: (frozenset({S}), S),
    DispatchEvent.DELIVER: (frozenset({S}), DispatchStatus.DELIVERED),
    DispatchEvent.RETRY: (frozenset({S}), RT),
    DispatchEvent.FAIL: (frozenset({S}), DispatchStatus.FAILED),
    DispatchEvent.RESEND: (frozenset({DispatchStatus.FAILED}), P),
    DispatchEvent.FORCE_RESEND: (frozenset({DispatchStatus.FAILED, DispatchStatus.DELIVERED}), P),
}


class ForbiddenTransition(ValueError):
    """A dispatch cannot take this step from its status."""


def target(status: DispatchStatus | str, event: DispatchEvent) -> DispatchStatus:
    sources, to = TRANSITIONS[event]
    current = DispatchStatus(status)
    if current not in sources:
        raise ForbiddenTransition(f"a {current} dispatch cannot {event.value.replace('_', ' ')}")
    return to or current


def apply(s: Session, dispatch_id: int, event: DispatchEvent, *conditions: ColumnElement[bool], **values: Any) -> bool:
    """The conditional UPDATE of one transition (the one place a dispatch's status is written);
    True if this caller made it."""
    sources, to = TRANSITIONS[event]
    values["status"] = to.value if to is not None else Dispatch.status
    result = s.execute(
        update(Dispatch).where(Dispatch.id == dispatch_id, Dispatch.status.in_([x.value for x in sources]), *conditions).values(**values)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def create(
    s: Session, now: datetime, actor: str, report: SRDocument, destination: str, study_uid: str | None, kinds: OutputKinds
) -> Dispatch:
    """A pending dispatch of ``report`` to ``destination``, in the caller's transaction: the
    output of the destination's kind is built first if the report has none yet."""
    output = outputs.ensure(s, now, actor, report, kinds.for_destination(destination), study_uid)
    dispatch = Dispatch(output_id=output.id, destination=destination, status=DispatchStatus.PENDING.value, attempts=0, created_at=now)
    s.add(dispatch)
    s.flush()
    audit.record(
        s,
        now,
        actor,
        Action.DISPATCH_QUEUED,
        "dispatch",
        dispatch.id,
        study_uid=study_uid,
        sr=report.sop_instance_uid,
        destination=destination,
        output=output.kind,
    )
    return dispatch


def create_all(
    s: Session, now: datetime, actor: str, report: SRDocument, study_uid: str | None, destinations: Sequence[str], kinds: OutputKinds
) -> list[Dispatch]:
    return [create(s, now, actor, report, destination, study_uid, kinds) for destination in destinations]


# -- publication --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Due:
    dispatch_id: int
    status: str
    study_uid: str


def due(s: Session, now: datetime, stale_after: timedelta, *, report_id: int | None = None) -> list[Due]:
    """Dispatches to hand to the broker: new ones, retries whose time has come, and ones whose
    message or worker went quiet for ``stale_after``."""
    stale = now - stale_after
    query = (
        select(Dispatch.id, Dispatch.status, Study.study_uid)
        .join(Output, Output.id == Dispatch.output_id)
        .join(SRDocument, SRDocument.id == Output.report_id)
        .join(Study, Study.id == SRDocument.study_id)
        .where(
            or_(
                Dispatch.status == DispatchStatus.PENDING,
                and_(Dispatch.status == DispatchStatus.RETRYING, Dispatch.next_attempt_at <= now),
                and_(Dispatch.status == DispatchStatus.ENQUEUED, Dispatch.enqueued_at < stale),
                and_(Dispatch.status == DispatchStatus.SENDING, Dispatch.started_at < stale),
            )
        )
        .order_by(Dispatch.id)
    )
    if report_id is not None:
        query = query.where(Output.report_id == report_id)
    return [Due(dispatch_id, status, study_uid) for dispatch_id, status, study_uid in s.execute(query).all()]


def mark_published(s: Session, now: datetime, actor: str, item: Due) -> bool:
    event = DispatchEvent.PUBLISH if item.status in (DispatchStatus.PENDING, DispatchStatus.RETRYING) else DispatchEvent.REPUBLISH
    moved = apply(s, item.dispatch_id, event, Dispatch.status == item.status, enqueued_at=now)
    if moved:  # someone else may have published it in between: one audit event per transition
        audit.record(
            s, now, actor, Action.DISPATCH_ENQUEUED, "dispatch", item.dispatch_id, study_uid=item.study_uid, previous_status=item.status
        )
    return moved


class DispatchPublisher(Protocol):
    def publish_dispatch(self, dispatch_id: int) -> None: ...


def publish_due(
    db: Database,
    clock: Clock,
    publisher: DispatchPublisher,
    stale_after: timedelta,
    *,
    report_id: int | None = None,
    actor: str = audit.SYSTEM_ASSEMBLER,
) -> int:
    """Publish what is due (all, or one report's: a caption worker sends its new SR's at once rather
    than waiting for the assembler's next pass). Returns how many were published."""
    now = clock.now()
    with db.session() as s:
        items = due(s, now, stale_after, report_id=report_id)
    published = 0
    for item in items:
        try:
            publisher.publish_dispatch(item.dispatch_id)
        except Exception:
            LOG.exception("cannot publish dispatch %d; will retry", item.dispatch_id)
            break  # the broker is probably down; try again next pass
        with db.session() as s:
            mark_published(s, now, actor, item)
        published += 1
    return published


# -- a worker's send ----------------------------------------------------------------------------------


def claim(s: Session, now: datetime, actor: str, dispatch_id: int, stale_after: timedelta) -> bool:
    """Start sending: a new, enqueued or due dispatch, or one whose worker went quiet mid-send."""
    fresh = apply(
        s,
        dispatch_id,
        DispatchEvent.CLAIM,
        or_(Dispatch.status != DispatchStatus.RETRYING, Dispatch.next_attempt_at <= now),
        started_at=now,
        attempts=Dispatch.attempts + 1,
    ) or apply(
        s, dispatch_id, DispatchEvent.TAKE_OVER, Dispatch.started_at < now - stale_after, started_at=now, attempts=Dispatch.attempts + 1
    )
    if not fresh:
        status = s.scalar(select(Dispatch.status).where(Dispatch.id == dispatch_id))
        audit.record(s, now, actor, Action.DISPATCH_SKIPPED, "dispatch", dispatch_id, status=status or "missing")
    return fresh


def deliver(s: Session, now: datetime, actor: str, dispatch_id: int, **details: Any) -> bool:
    """Delivered; once every destination of a draft has each of its outputs, its job reaches its last milestone."""
    if not apply(s, dispatch_id, DispatchEvent.DELIVER, delivered_at=now, error=None):
        return False
    audit.record(s, now, actor, Action.DISPATCH_DELIVERED, "dispatch", dispatch_id, **details)
    doc_id = s.scalar(select(Output.report_id).join(Dispatch, Dispatch.output_id == Output.id).where(Dispatch.id == dispatch_id))
    still_open = s.scalar(
        select(func.count())
        .select_from(Dispatch)
        .join(Output, Output.id == Dispatch.output_id)
        .where(Output.report_id == doc_id, Dispatch.status != DispatchStatus.DELIVERED)
    )
    job_id = s.scalar(select(SRDocument.job_id).where(SRDocument.id == doc_id, SRDocument.kind == SRKind.DRAFT))
    if not still_open and job_id is not None:
        jobs.acknowledge(s, now, job_id)
    return True


def retry_later(s: Session, now: datetime, actor: str, dispatch_id: int, error: str | None, delay_seconds: float, **details: Any) -> bool:
    if not apply(s, dispatch_id, DispatchEvent.RETRY, error=error, next_attempt_at=now + timedelta(seconds=delay_seconds)):
        return False
    audit.record(
        s, now, actor, Action.DISPATCH_RETRY_SCHEDULED, "dispatch", dispatch_id, error=error, delay_seconds=delay_seconds, **details
    )
    return True


def fail(s: Session, now: datetime, actor: str, dispatch_id: int, error: str | None, **details: Any) -> bool:
    if not apply(s, dispatch_id, DispatchEvent.FAIL, error=error):
        return False
    audit.record(s, now, actor, Action.DISPATCH_FAILED, "dispatch", dispatch_id, error=error, **details)
    return True


def resend(s: Session, now: datetime, actor: str, dispatch: Dispatch, *, force: bool, study_uid: str | None, sr_uid: str) -> bool:
    """An operator sends ``dispatch`` again from the start (a failed one; with ``force``, a delivered one too)."""
    event = DispatchEvent.FORCE_RESEND if force else DispatchEvent.RESEND
    if DispatchStatus(dispatch.status) not in TRANSITIONS[event][0]:
        return False
    if not apply(s, dispatch.id, event, Dispatch.status == dispatch.status, attempts=0, next_attempt_at=None, delivered_at=None):
        return False
    audit.record(
        s,
        now,
        actor,
        Action.DISPATCH_RESEND_REQUESTED,
        "dispatch",
        dispatch.id,
        study_uid=study_uid,
        sr=sr_uid,
        destination=dispatch.destination,
    )
    return True
