"""Study assembly: decide when a study is complete enough to caption, and hand it on.

There is no "study complete" message in DICOM. A study with pending instances (received,
not yet in a version) becomes a new *version* when

* nothing arrived for ``quiet_seconds`` and no open association has sent it pending
  instances (``stable``), or
* its oldest pending instance has waited ``max_wait_seconds`` (``max_wait``), or
* an operator ran ``medcap force`` (``forced``).

Each version gets exactly one job (a unique constraint, not a promise); a newer version
supersedes the older version's unfinished job. All of this state is in the database, so a
restarted process carries on where the last one stopped, and several assemblers may run
against one database without creating duplicates.
"""

from __future__ import annotations

import enum
import logging
import threading
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import audit
from service.audit import Action
from service.clock import Clock
from service.database import Database
from service.schema import (
    Association,
    Dispatch,
    DispatchStatus,
    Instance,
    Job,
    JobStatus,
    SRDocument,
    Study,
    StudyVersion,
    UTCDateTime,
)

LOG = logging.getLogger(__name__)


class JobPublisher(Protocol):
    """Hands job and dispatch ids to the queues (Celery in production)."""

    def publish(self, job_id: int) -> None: ...

    def publish_dispatch(self, dispatch_id: int) -> None: ...


class Assembler:
    def __init__(
        self, db: Database, clock: Clock, publisher: JobPublisher, *, quiet_seconds: float, max_wait_seconds: float,
        redeliver_seconds: float, dispatch_stale_seconds: float = 120.0,
    ) -> None:  # fmt: skip
        self.db = db
        self.clock = clock
        self.publisher = publisher
        self.quiet = timedelta(seconds=quiet_seconds)
        self.max_wait = timedelta(seconds=max_wait_seconds)
        self.redeliver = timedelta(seconds=redeliver_seconds)
        self.dispatch_stale = timedelta(seconds=dispatch_stale_seconds)

    def tick(self) -> list[int]:
        """One pass: create the versions and jobs that are due, then publish unpublished or due
        jobs and dispatches.

        Returns the ids of the jobs created in this pass.
        """
        created = [job_id for study_id, trigger in self.due_studies() if (job_id := self.create_version(study_id, trigger))]
        self.publish_pending()
        self.publish_dispatches()
        return created

    def due_studies(self) -> list[tuple[int, str]]:
        now = self.clock.now()
        with self.db.session() as s:
            sending = (
                select(Instance.id)
                .join(Association, Association.id == Instance.association_id)
                .where(Instance.study_id == Study.id, Instance.version_number.is_(None), Association.ended_at.is_(None))
            )
            rows = s.execute(
                select(
                    Study.id, func.min(Instance.received_at, type_=UTCDateTime), func.max(Instance.received_at, type_=UTCDateTime),
                    Study.force_requested_at, exists(sending),
                )
                .join(Instance, Instance.study_id == Study.id)
                .where(Instance.version_number.is_(None))
                .group_by(Study.id, Study.force_requested_at)
            ).all()  # fmt: skip
        due = []
        for study_id, first, last, forced, still_sending in rows:
            if forced is not None:
                due.append((study_id, "forced"))
            elif now - first >= self.max_wait:
                due.append((study_id, "max_wait"))
            elif now - last >= self.quiet and not still_sending:
                due.append((study_id, "stable"))
        return due

    def create_version(self, study_id: int, trigger: str) -> int | None:
        """Freeze the study's pending instances into a new version with one job. Returns the job id."""
        now = self.clock.now()
        try:
            with self.db.session() as s:
                study_uid = s.scalar(select(Study.study_uid).where(Study.id == study_id))
                number = (s.scalar(select(func.max(StudyVersion.number)).where(StudyVersion.study_id == study_id)) or 0) + 1
                newly = s.execute(
                    update(Instance)
                    .where(Instance.study_id == study_id, Instance.version_number.is_(None))
                    .values(version_number=number)
                ).rowcount  # type: ignore[attr-defined]
                if not newly:
                    return None  # another assembler got there first
                total, captionable = s.execute(
                    select(func.count(), func.count().filter(Instance.captionable)).where(Instance.study_id == study_id)
                ).one()
                version = StudyVersion(study_id=study_id, number=number, created_at=now, trigger=trigger,
                                       instance_count=total, captionable_count=captionable)  # fmt: skip
                s.add(version)
                s.flush()
                job = Job(study_version_id=version.id, status=JobStatus.QUEUED.value, created_at=now, attempts=0)
                s.add(job)
                s.flush()
                audit.record(s, now, audit.SYSTEM_ASSEMBLER, Action.STUDY_VERSION_CREATED, "study_version", version.id,
                             study_uid=study_uid, number=number, trigger=trigger, new_instances=newly,
                             instances=total, captionable=captionable)  # fmt: skip
                audit.record(s, now, audit.SYSTEM_ASSEMBLER, Action.JOB_CREATED, "job", job.id, study_uid=study_uid,
                             study_version=number)  # fmt: skip
                self._supersede_older_jobs(s, study_id, study_uid, job.id, now)
                s.execute(update(Study).where(Study.id == study_id).values(force_requested_at=None))
                LOG.info("study %s version %d (%s): %d instances, job %d", study_uid, number, trigger, total, job.id)
                return job.id
        except IntegrityError:
            LOG.info("study %d: version created concurrently elsewhere", study_id)
            return None

    def _supersede_older_jobs(self, s: Session, study_id: int, study_uid: str | None, new_job_id: int, now: datetime) -> None:
        older = s.scalars(
            select(Job.id)
            .join(StudyVersion, StudyVersion.id == Job.study_version_id)
            .where(StudyVersion.study_id == study_id, Job.id != new_job_id,
                   Job.status.in_([JobStatus.QUEUED, JobStatus.ENQUEUED, JobStatus.RUNNING]))
        ).all()  # fmt: skip
        for job_id in older:
            s.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.SUPERSEDED.value, superseded_by_job_id=new_job_id,
                                                                 finished_at=now))  # fmt: skip
            audit.record(s, now, audit.SYSTEM_ASSEMBLER, Action.JOB_SUPERSEDED, "job", job_id, study_uid=study_uid,  # type: ignore[arg-type]
                         superseded_by=new_job_id)  # fmt: skip

    def publish_pending(self) -> int:
        """Publish jobs not yet handed to the broker, and re-publish ones that went quiet.

        The broker is a doorbell: jobs live in the database, so a publish lost to a crash
        or a dead worker is repeated here. The worker's claim makes repeats harmless.
        """
        now = self.clock.now()
        stale = now - self.redeliver
        with self.db.session() as s:
            rows = s.execute(
                select(Job.id, Job.status, Study.study_uid)
                .join(StudyVersion, StudyVersion.id == Job.study_version_id)
                .join(Study, Study.id == StudyVersion.study_id)
                .where(
                    or_(
                        and_(Job.status == JobStatus.QUEUED, or_(Job.not_before.is_(None), Job.not_before <= now)),
                        and_(Job.status == JobStatus.ENQUEUED, Job.enqueued_at < stale),
                        and_(Job.status == JobStatus.RUNNING, Job.started_at < stale),
                    )
                ).order_by(Job.id)
            ).all()  # fmt: skip
        published = 0
        for job_id, status, study_uid in rows:
            try:
                self.publisher.publish(job_id)
            except Exception:
                LOG.exception("cannot publish job %d; will retry", job_id)
                break  # the broker is probably down; try again next tick
            with self.db.session() as s:
                values: dict[str, object] = {"enqueued_at": now}
                if status == JobStatus.QUEUED:
                    values["status"] = JobStatus.ENQUEUED.value
                s.execute(update(Job).where(Job.id == job_id, Job.status == status).values(**values))
                action = Action.JOB_ENQUEUED if status == JobStatus.QUEUED else Action.JOB_REENQUEUED
                audit.record(s, now, audit.SYSTEM_ASSEMBLER, action, "job", job_id, study_uid=study_uid, previous_status=status)
            published += 1
        return published

    def publish_dispatches(self) -> int:
        """The same doorbell for SRs on their way to a PACS: new ones, retries that are due, and
        ones whose worker went quiet."""
        return publish_dispatches(self.db, self.clock, self.publisher, self.dispatch_stale)

    def request_force(self, study_uid: str, actor: str) -> ForceResult:
        """Mark a study for processing now; the next tick (anywhere) makes the version."""
        now = self.clock.now()
        with self.db.session() as s:
            study_id = s.scalar(select(Study.id).where(Study.study_uid == study_uid))
            if study_id is None:
                return ForceResult.UNKNOWN_STUDY
            pending = s.scalar(select(func.count()).where(Instance.study_id == study_id, Instance.version_number.is_(None)))
            if not pending:
                return ForceResult.NOTHING_PENDING
            s.execute(update(Study).where(Study.id == study_id).values(force_requested_at=now))
            audit.record(s, now, actor, Action.STUDY_FORCE_REQUESTED, "study", study_uid, study_uid=study_uid, pending=pending)
        return ForceResult.REQUESTED


def publish_dispatches(db: Database, clock: Clock, publisher: JobPublisher, stale_after: timedelta, *, sr_document_id: int | None = None,
                       actor: str = audit.SYSTEM_ASSEMBLER) -> int:  # fmt: skip
    """Publish the dispatches that are due (all, or one SR's: a caption worker sends its new SR's
    at once rather than waiting for the assembler's next pass). Returns how many were published."""
    now = clock.now()
    stale = now - stale_after
    with db.session() as s:
        query = (
            select(Dispatch.id, Dispatch.status, Study.study_uid)
            .join(SRDocument, SRDocument.id == Dispatch.sr_document_id)
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
        if sr_document_id is not None:
            query = query.where(Dispatch.sr_document_id == sr_document_id)
        rows = s.execute(query).all()
    published = 0
    for dispatch_id, status, study_uid in rows:
        try:
            publisher.publish_dispatch(dispatch_id)
        except Exception:
            LOG.exception("cannot publish dispatch %d; will retry", dispatch_id)
            break
        with db.session() as s:
            values: dict[str, object] = {"enqueued_at": now}
            if status in (DispatchStatus.PENDING, DispatchStatus.RETRYING):
                values["status"] = DispatchStatus.ENQUEUED.value
            moved = s.execute(update(Dispatch).where(Dispatch.id == dispatch_id, Dispatch.status == status).values(**values)).rowcount  # type: ignore[attr-defined]
            if moved:  # someone else may have published it in between: one audit event per transition
                audit.record(s, now, actor, Action.DISPATCH_ENQUEUED, "dispatch", dispatch_id, study_uid=study_uid, previous_status=status)
        published += 1
    return published


class ForceResult(enum.Enum):
    REQUESTED = "requested"
    UNKNOWN_STUDY = "unknown study"
    NOTHING_PENDING = "nothing pending"


class AssemblyLoop:
    """Runs :meth:`Assembler.tick` every ``interval`` seconds in a daemon thread."""

    def __init__(self, assembler: Assembler, interval: float) -> None:
        self.assembler = assembler
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="medcap-assembler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.assembler.tick()
            except Exception:
                LOG.exception("assembly pass failed; retrying")
            self._stop.wait(self.interval)
