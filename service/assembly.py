"""Study assembly: decide when a study is complete enough to caption, and hand it on.

There is no "study complete" message in DICOM. A study with pending instances (received,
not yet in a version) becomes a new *version* when

* nothing arrived for ``quiet_seconds`` and no open association has sent it pending
  instances (``stable``), or
* its oldest pending instance has waited ``max_wait_seconds`` (``max_wait``), or
* an operator ran ``medcap force`` (``forced``).

Instances that no model reads (an SR, a dose report: not ``captionable``) arriving after the
first version make no new version: they join the newest one. Otherwise a PACS that forwards a
whole study back, our draft SR included, would have it captioned again with every draft.

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

from sqlalchemy import exists, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import audit
from service import dispatch_lifecycle as dispatches
from service import job_lifecycle as jobs
from service.audit import Action
from service.clock import Clock
from service.database import Database
from service.schema import (
    Association,
    Instance,
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
        self,
        db: Database,
        clock: Clock,
        publisher: JobPublisher,
        *,
        quiet_seconds: float,
        max_wait_seconds: float,
        redeliver_seconds: float,
        dispatch_stale_seconds: float = 120.0,
    ) -> None:
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
                    Study.id,
                    func.min(Instance.received_at, type_=UTCDateTime),
                    func.max(Instance.received_at, type_=UTCDateTime),
                    Study.force_requested_at,
                    exists(sending),
                )
                .join(Instance, Instance.study_id == Study.id)
                .where(Instance.version_number.is_(None))
                .group_by(Study.id, Study.force_requested_at)
            ).all()
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
                latest = s.scalar(select(func.max(StudyVersion.number)).where(StudyVersion.study_id == study_id))
                if latest is not None and trigger != "forced" and self._nothing_to_caption(s, study_id):
                    self._join_latest(s, now, study_id, study_uid, latest)
                    return None
                number = (latest or 0) + 1
                newly = s.execute(
                    update(Instance).where(Instance.study_id == study_id, Instance.version_number.is_(None)).values(version_number=number)
                ).rowcount  # type: ignore[attr-defined]
                if not newly:
                    return None  # another assembler got there first
                total, captionable = s.execute(
                    select(func.count(), func.count().filter(Instance.captionable)).where(Instance.study_id == study_id)
                ).one()
                version = StudyVersion(
                    study_id=study_id, number=number, created_at=now, trigger=trigger, instance_count=total, captionable_count=captionable
                )
                s.add(version)
                s.flush()
                audit.record(
                    s,
                    now,
                    audit.SYSTEM_ASSEMBLER,
                    Action.STUDY_VERSION_CREATED,
                    "study_version",
                    version.id,
                    study_uid=study_uid,
                    number=number,
                    trigger=trigger,
                    new_instances=newly,
                    instances=total,
                    captionable=captionable,
                )
                job_id = jobs.create(s, now, audit.SYSTEM_ASSEMBLER, version.id, study_uid=study_uid, version_number=number)
                jobs.supersede_older(s, now, audit.SYSTEM_ASSEMBLER, study_id, job_id, study_uid)
                s.execute(update(Study).where(Study.id == study_id).values(force_requested_at=None))
                LOG.info("study %s version %d (%s): %d instances, job %d", study_uid, number, trigger, total, job_id)
                return job_id
        except IntegrityError:
            LOG.info("study %d: version created concurrently elsewhere", study_id)
            return None

    @staticmethod
    def _nothing_to_caption(s: Session, study_id: int) -> bool:
        pending = select(Instance.id).where(Instance.study_id == study_id, Instance.version_number.is_(None))
        return not s.scalar(select(exists(pending.where(Instance.captionable))))

    def _join_latest(self, s: Session, now: datetime, study_id: int, study_uid: str | None, latest: int) -> None:
        """The pending instances, none of them captionable, join version ``latest``: no new job."""
        newly = s.execute(
            update(Instance).where(Instance.study_id == study_id, Instance.version_number.is_(None)).values(version_number=latest)
        ).rowcount  # type: ignore[attr-defined]
        if not newly:
            return  # another assembler got there first
        total = s.scalar(select(func.count()).where(Instance.study_id == study_id, Instance.version_number <= latest))
        version = s.execute(
            update(StudyVersion)
            .where(StudyVersion.study_id == study_id, StudyVersion.number == latest)
            .values(instance_count=total)
            .returning(StudyVersion.id)
        ).scalar_one()
        audit.record(
            s,
            now,
            audit.SYSTEM_ASSEMBLER,
            Action.STUDY_NOTHING_TO_CAPTION,
            "study_version",
            version,
            study_uid=study_uid,
            number=latest,
            new_instances=newly,
            instances=total,
        )
        LOG.info("study %s: %d instances no model reads joined version %d; no new job", study_uid, newly, latest)

    def publish_pending(self) -> int:
        """Publish jobs not yet handed to the broker, and re-publish ones that went quiet (a lost
        message, or a worker whose lease ran out: the next delivery takes the job over).

        The broker is a doorbell: jobs live in the database, so a publish lost to a crash
        or a dead worker is repeated here. The worker's claim makes repeats harmless.
        """
        now = self.clock.now()
        with self.db.session() as s:
            due = jobs.publishable(s, now, self.redeliver)
        published = 0
        for job in due:
            try:
                self.publisher.publish(job.job_id)
            except Exception:
                LOG.exception("cannot publish job %d; will retry", job.job_id)
                break  # the broker is probably down; try again next tick
            with self.db.session() as s:
                jobs.mark_published(s, now, audit.SYSTEM_ASSEMBLER, job)
            published += 1
        return published

    def publish_dispatches(self) -> int:
        """The same doorbell for SRs on their way to a PACS: new ones, retries that are due, and
        ones whose worker went quiet."""
        return dispatches.publish_due(self.db, self.clock, self.publisher, self.dispatch_stale)

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
