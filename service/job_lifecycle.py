"""The life of a caption job: every status change of a ``jobs`` row happens here, and nowhere else.

::

    queued ──publish──▶ enqueued ──claim──▶ running ──succeed──▶ succeeded
      ▲  └──────────────claim───────────────▲  │ ├──fail───────▶ failed ──requeue (operator)──▶ queued
      │                                        │ └──retry (backoff)──▶ queued
      │                       running ──take over (lease expired, or its worker process is dead)──▶ running
      │                       running ──renew (its owner)──▶ running
    queued | enqueued | running ──supersede (a newer study version)──▶ superseded

Each transition is one conditional UPDATE: the statuses it may leave (from :data:`TRANSITIONS`),
plus the owner where ownership matters, with its audit event in the same transaction. Two
processes racing on one job cannot both win, and a transition the table forbids never reaches
the database.

A claim carries its worker process (``host:pid``) and a lease the worker renews while it runs.
A job whose lease ran out, or whose worker process on this host is gone, is taken over by the
next delivery at once (a crashed worker costs seconds, not the broker's redelivery timeout).
"""

from __future__ import annotations

import enum
import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import Session

from service import audit
from service.audit import Action
from service.schema import Job, JobStatus, Study, StudyVersion


class JobEvent(enum.StrEnum):
    PUBLISH = "publish"  # handed to the broker
    REPUBLISH = "republish"  # handed again: the message or its worker went quiet
    CLAIM = "claim"  # a worker starts it
    TAKE_OVER = "take_over"  # a worker starts it again: the last one's lease ran out or its process died
    RENEW = "renew"  # the owner extends its lease
    SUCCEED = "succeed"
    FAIL = "fail"  # permanently: a bad study, out of attempts, or abandoned by dying workers
    RETRY = "retry"  # a transient failure: queued again after a backoff
    SUPERSEDE = "supersede"  # a newer version of the study has its own job
    REQUEUE = "requeue"  # an operator retries a failed job (`medcap retry`)


Q, E, R = JobStatus.QUEUED, JobStatus.ENQUEUED, JobStatus.RUNNING
#: event -> (statuses it may leave, status it leads to; None: unchanged)
TRANSITIONS: dict[JobEvent, tuple[frozenset[JobStatus], JobStatus | None]] = {
    JobEvent.PUBLISH: (frozenset({Q}), E),
    JobEvent.REPUBLISH: (frozenset({E, R}), None),
    JobEvent.CLAIM: (frozenset({Q, E}), R),
    JobEvent.TAKE_OVER: (frozenset({R}), R),
    JobEvent.RENEW: (frozenset({R}), R),
    JobEvent.SUCCEED: (frozenset({R}), JobStatus.SUCCEEDED),
    JobEvent.FAIL: (frozenset({R}), JobStatus.FAILED),
    JobEvent.RETRY: (frozenset({R}), Q),
    JobEvent.SUPERSEDE: (frozenset({Q, E, R}), JobStatus.SUPERSEDED),
    JobEvent.REQUEUE: (frozenset({JobStatus.FAILED}), Q),
}


class ForbiddenTransition(ValueError):
    """A job cannot take this step from its status."""


def target(status: JobStatus | str, event: JobEvent) -> JobStatus:
    """The status ``event`` leads to from ``status``, or :class:`ForbiddenTransition`."""
    sources, to = TRANSITIONS[event]
    current = JobStatus(status)
    if current not in sources:
        raise ForbiddenTransition(f"a {current} job cannot {event.value.replace('_', ' ')}")
    return to or current


def this_process() -> str:
    """The owner recorded with a claim: which process on which host holds the job."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_is_dead(owner: str | None) -> bool:
    """True only when ``owner`` is a process of this host that no longer exists (another host's
    processes cannot be seen from here: their leases run out instead)."""
    if not owner or ":" not in owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def attempts_of(s: Session, job_id: int) -> int:
    return s.scalar(select(Job.attempts).where(Job.id == job_id)) or 0


def study_uid_of(s: Session, job_id: int) -> str | None:
    return s.scalar(
        select(Study.study_uid)
        .join(StudyVersion, StudyVersion.study_id == Study.id)
        .join(Job, Job.study_version_id == StudyVersion.id)
        .where(Job.id == job_id)
    )


def apply(s: Session, job_id: int, event: JobEvent, *conditions: ColumnElement[bool], **values: Any) -> bool:
    """The conditional UPDATE of one transition (the one place a job's status is written): it
    leaves only the statuses :data:`TRANSITIONS` allows for ``event``, and only where the extra
    ``conditions`` hold. True if this caller made the transition."""
    sources, to = TRANSITIONS[event]
    values["status"] = to.value if to is not None else Job.status  # unchanged: still an UPDATE, so its row count says who won
    result = s.execute(update(Job).where(Job.id == job_id, Job.status.in_([x.value for x in sources]), *conditions).values(**values))
    return bool(result.rowcount)  # type: ignore[attr-defined]


# -- creation and publication (the assembler) ----------------------------------------------------------


def create(s: Session, now: datetime, actor: str, study_version_id: int, *, study_uid: str | None, version_number: int) -> int:
    """A new queued job for a study version; returns its id."""
    job = Job(study_version_id=study_version_id, status=JobStatus.QUEUED.value, created_at=now, attempts=0)
    s.add(job)
    s.flush()
    audit.record(s, now, actor, Action.JOB_CREATED, "job", job.id, study_uid=study_uid, study_version=version_number)
    return job.id


def supersede_older(s: Session, now: datetime, actor: str, study_id: int, new_job_id: int, study_uid: str | None) -> list[int]:
    """Every unfinished job of the study's older versions ends superseded by ``new_job_id``."""
    sources, _ = TRANSITIONS[JobEvent.SUPERSEDE]
    older = s.scalars(
        select(Job.id)
        .join(StudyVersion, StudyVersion.id == Job.study_version_id)
        .where(StudyVersion.study_id == study_id, Job.id != new_job_id, Job.status.in_([x.value for x in sources]))
    ).all()
    done = []
    for job_id in older:
        if apply(s, job_id, JobEvent.SUPERSEDE, superseded_by_job_id=new_job_id, finished_at=now):
            audit.record(s, now, actor, Action.JOB_SUPERSEDED, "job", job_id, study_uid=study_uid, superseded_by=new_job_id)
            done.append(job_id)
    return done


@dataclass(frozen=True)
class Publishable:
    job_id: int
    status: str
    study_uid: str


def publishable(s: Session, now: datetime, enqueued_stale_after: timedelta) -> list[Publishable]:
    """Jobs to hand to the broker: queued ones past their backoff, enqueued ones whose message went
    quiet, running ones whose lease ran out (their worker died: the next delivery takes over)."""
    rows = s.execute(
        select(Job.id, Job.status, Study.study_uid)
        .join(StudyVersion, StudyVersion.id == Job.study_version_id)
        .join(Study, Study.id == StudyVersion.study_id)
        .where(
            or_(
                and_(Job.status == JobStatus.QUEUED, or_(Job.not_before.is_(None), Job.not_before <= now)),
                and_(Job.status == JobStatus.ENQUEUED, Job.enqueued_at < now - enqueued_stale_after),
                and_(Job.status == JobStatus.RUNNING, _lease_over(now)),
            )
        )
        .order_by(Job.id)
    ).all()
    due = [Publishable(job_id, status, study_uid) for job_id, status, study_uid in rows]
    # A running job whose worker process on this host is gone need not wait for its lease.
    held = s.execute(
        select(Job.id, Job.claimed_by, Study.study_uid)
        .join(StudyVersion, StudyVersion.id == Job.study_version_id)
        .join(Study, Study.id == StudyVersion.study_id)
        .where(Job.status == JobStatus.RUNNING, Job.lease_until >= now)
    ).all()
    due += [Publishable(job_id, JobStatus.RUNNING.value, study_uid) for job_id, owner, study_uid in held if owner_is_dead(owner)]
    return sorted(due, key=lambda job: job.job_id)


#: A running job claimed before claims had leases (migration 0005) counts as leased this long.
LEGACY_LEASE = timedelta(seconds=900)


def _lease_over(now: datetime) -> ColumnElement[bool]:
    return or_(Job.lease_until < now, and_(Job.lease_until.is_(None), Job.started_at < now - LEGACY_LEASE))


def mark_published(s: Session, now: datetime, actor: str, job: Publishable) -> bool:
    """Record that ``job`` was handed to the broker (queued -> enqueued, or a re-publication)."""
    event = JobEvent.PUBLISH if job.status == JobStatus.QUEUED else JobEvent.REPUBLISH
    if not apply(s, job.job_id, event, Job.status == job.status, enqueued_at=now):
        return False
    action = Action.JOB_ENQUEUED if event is JobEvent.PUBLISH else Action.JOB_REENQUEUED
    audit.record(s, now, actor, action, "job", job.job_id, study_uid=job.study_uid, previous_status=job.status)
    return True


# -- a worker's claim and its outcome ----------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    claimed: bool
    attempts: int
    status: str | None  # the job's status when not claimed ("missing" if there is no such job)
    took_over_from: str | None = None


def claim(s: Session, now: datetime, actor: str, job_id: int, owner: str, lease: timedelta) -> Claim:
    """Start the job for ``owner``: a fresh claim, or a take-over of a running one whose lease ran
    out or whose process is dead. Audited as started (with whom it took over from) or skipped."""
    row = s.execute(select(Job.status, Job.claimed_by, Job.lease_until, Job.started_at).where(Job.id == job_id)).one_or_none()
    study_uid = study_uid_of(s, job_id)
    if row is None:
        audit.record(s, now, actor, Action.JOB_SKIPPED, "job", job_id, study_uid=study_uid, status="missing")
        return Claim(False, 0, "missing")
    status, previous_owner, lease_until, _ = row
    values = dict(started_at=now, attempts=Job.attempts + 1, claimed_by=owner, lease_until=now + lease)
    took_over: str | None = None
    if status in (JobStatus.QUEUED, JobStatus.ENQUEUED):
        moved = apply(s, job_id, JobEvent.CLAIM, **values)
    elif status == JobStatus.RUNNING and (owner_is_dead(previous_owner) or (lease_until is not None and lease_until < now)):
        # Compare-and-set on the owner and lease we saw: of two racing take-overs, one wins.
        same = Job.claimed_by.is_(None) if previous_owner is None else Job.claimed_by == previous_owner
        moved = apply(
            s, job_id, JobEvent.TAKE_OVER, same, Job.lease_until == lease_until if lease_until else Job.lease_until.is_(None), **values
        )
        took_over = previous_owner or "unknown"
    elif status == JobStatus.RUNNING and lease_until is None:  # claimed before leases existed
        moved = apply(s, job_id, JobEvent.TAKE_OVER, Job.lease_until.is_(None), Job.started_at < now - LEGACY_LEASE, **values)
        took_over = previous_owner or "unknown"
    else:
        moved = False
    attempts = s.scalar(select(Job.attempts).where(Job.id == job_id)) or 0
    if moved:
        details = {"owner": owner} | ({"took_over_from": took_over} if took_over else {})
        audit.record(s, now, actor, Action.JOB_STARTED, "job", job_id, study_uid=study_uid, **details)
        return Claim(True, attempts, JobStatus.RUNNING.value, took_over)
    current = s.scalar(select(Job.status).where(Job.id == job_id))
    audit.record(s, now, actor, Action.JOB_SKIPPED, "job", job_id, study_uid=study_uid, status=current or "missing")
    return Claim(False, attempts, current)


def renew(s: Session, now: datetime, job_id: int, owner: str, lease: timedelta) -> bool:
    """Extend the owner's lease (no audit event: it is a heartbeat). False: the job is no longer ours."""
    return apply(s, job_id, JobEvent.RENEW, Job.claimed_by == owner, lease_until=now + lease)


def _mine(owner: str | None) -> tuple[ColumnElement[bool], ...]:
    return () if owner is None else (Job.claimed_by == owner,)


def succeed(
    s: Session,
    now: datetime,
    actor: str,
    job_id: int,
    *,
    owner: str | None,
    study_uid: str | None,
    inferred_at: datetime | None = None,
    sr_written: bool = False,
    **details: Any,
) -> bool:
    """The job's success, in the transaction that records its results (the caller's)."""
    values: dict[str, Any] = dict(finished_at=now, worker=actor, error=None, lease_until=None)
    if inferred_at is not None:
        values["inferred_at"] = inferred_at
    if sr_written:
        values["sr_written_at"] = now
    if not apply(s, job_id, JobEvent.SUCCEED, *_mine(owner), **values):
        return False
    audit.record(s, now, actor, Action.JOB_SUCCEEDED, "job", job_id, study_uid=study_uid, **details)
    return True


def fail(s: Session, now: datetime, actor: str, job_id: int, error: str, *, owner: str | None, **details: Any) -> bool:
    """The job ends failed with its reason, where ``medcap retry`` can pick it up."""
    if not apply(s, job_id, JobEvent.FAIL, *_mine(owner), finished_at=now, error=error, worker=actor, lease_until=None):
        return False
    audit.record(s, now, actor, Action.JOB_FAILED, "job", job_id, study_uid=study_uid_of(s, job_id), error=error, **details)
    return True


def retry_later(
    s: Session, now: datetime, actor: str, job_id: int, error: str, delay_seconds: float, *, owner: str | None, attempts: int
) -> bool:
    """A transient failure: back to the queue, published again after ``delay_seconds``."""
    if not apply(
        s, job_id, JobEvent.RETRY, *_mine(owner), error=error, not_before=now + timedelta(seconds=delay_seconds), lease_until=None
    ):
        return False
    audit.record(
        s,
        now,
        actor,
        Action.JOB_RETRY_SCHEDULED,
        "job",
        job_id,
        study_uid=study_uid_of(s, job_id),
        error=error,
        attempts=attempts,
        delay_seconds=delay_seconds,
    )
    return True


def requeue(s: Session, now: datetime, actor: str, job_id: int) -> None:
    """An operator's retry of a failed job, with fresh attempts (:class:`ForbiddenTransition` otherwise)."""
    job = s.get(Job, job_id)
    if job is None:
        raise LookupError(f"there is no job {job_id}")
    target(job.status, JobEvent.REQUEUE)
    previous_error = job.error
    if not apply(s, job_id, JobEvent.REQUEUE, attempts=0, not_before=None, finished_at=None, claimed_by=None, lease_until=None):
        raise ForbiddenTransition(f"job {job_id} changed while it was being retried")
    audit.record(s, now, actor, Action.JOB_RETRY_REQUESTED, "job", job_id, study_uid=study_uid_of(s, job_id), previous_error=previous_error)


def acknowledge(s: Session, now: datetime, job_id: int) -> None:
    """The job's last milestone (not a status): every destination of its draft SR has the report."""
    s.execute(update(Job).where(Job.id == job_id, Job.acknowledged_at.is_(None)).values(acknowledged_at=now))
