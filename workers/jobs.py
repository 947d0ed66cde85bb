"""Running a job: claim it atomically, do the work, record the outcome.

The claim is a conditional UPDATE, so a job delivered twice (broker redelivery, a stale
job re-published by the assembler) runs once, and a superseded job does not run at all.
A transient failure sends the job back to ``queued`` with a backoff (the assembler publishes
it again when due); after ``max_attempts`` claims, or on a permanent error, it ends ``failed``
with its reason, where ``medcap retry`` can pick it up. A job whose worker died counts the
lost attempt too, so a study that kills workers cannot loop forever.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from service import audit
from service.audit import Action
from service.clock import Clock
from service.database import Database
from service.schema import Job, JobStatus, Study, StudyVersion
from workers.drafting import NotOurs, PermanentJobError

LOG = logging.getLogger(__name__)


class JobRunner:
    def __init__(self, db: Database, clock: Clock, actor: str, stale_seconds: float, *, max_attempts: int = 3,
                 retry_delay: Callable[[int], float] = lambda attempts: 5.0 * 2 ** (attempts - 1)) -> None:  # fmt: skip
        self.db = db
        self.clock = clock
        self.actor = actor
        self.stale = timedelta(seconds=stale_seconds)
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay

    def claim(self, job_id: int) -> bool:
        now = self.clock.now()
        with self.db.session() as s:
            claimed = s.execute(
                update(Job)
                .where(
                    Job.id == job_id,
                    or_(
                        Job.status.in_([JobStatus.QUEUED, JobStatus.ENQUEUED]),
                        and_(Job.status == JobStatus.RUNNING, Job.started_at < now - self.stale),
                    ),
                )
                .values(status=JobStatus.RUNNING.value, started_at=now, attempts=Job.attempts + 1)
            ).rowcount  # type: ignore[attr-defined]
            study_uid = self._study_uid(s, job_id)
            attempts = s.scalar(select(Job.attempts).where(Job.id == job_id)) or 0
            if claimed and attempts > self.max_attempts:
                # Claimed max_attempts times already without finishing: the workers died on it.
                s.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.FAILED.value, finished_at=now,
                                                                     error=f"abandoned by a worker {attempts - 1} times (crash or time limit)"))  # fmt: skip
                audit.record(s, now, self.actor, Action.JOB_FAILED, "job", job_id, study_uid=study_uid,
                             error="worker lost or out of time", attempts=attempts - 1)  # fmt: skip
                return False
            if claimed:
                audit.record(s, now, self.actor, Action.JOB_STARTED, "job", job_id, study_uid=study_uid)
            else:
                status = s.scalar(select(Job.status).where(Job.id == job_id))
                audit.record(s, now, self.actor, Action.JOB_SKIPPED, "job", job_id, study_uid=study_uid,
                             status=status or "missing")  # fmt: skip
        return bool(claimed)

    def finish(self, job_id: int, *, error: str | None = None, **details: object) -> None:
        now = self.clock.now()
        status = JobStatus.FAILED if error else JobStatus.SUCCEEDED
        with self.db.session() as s:
            # A job superseded while it ran stays superseded.
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.RUNNING)
                .values(status=status.value, finished_at=now, error=error, worker=self.actor)
            )
            action = Action.JOB_FAILED if error else Action.JOB_SUCCEEDED
            audit.record(s, now, self.actor, action, "job", job_id, study_uid=self._study_uid(s, job_id), error=error, **details)

    def retry_or_fail(self, job_id: int, error: str) -> str:
        """After a transient failure: back to the queue with a backoff, or failed when out of attempts."""
        now = self.clock.now()
        with self.db.session() as s:
            attempts = s.scalar(select(Job.attempts).where(Job.id == job_id)) or 0
            study_uid = self._study_uid(s, job_id)
            if attempts >= self.max_attempts:
                s.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING)
                          .values(status=JobStatus.FAILED.value, finished_at=now, error=error, worker=self.actor))  # fmt: skip
                audit.record(s, now, self.actor, Action.JOB_FAILED, "job", job_id, study_uid=study_uid, error=error, attempts=attempts)
                return "failed"
            delay = self.retry_delay(attempts)
            s.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING)
                      .values(status=JobStatus.QUEUED.value, error=error, not_before=now + timedelta(seconds=delay)))  # fmt: skip
            audit.record(s, now, self.actor, Action.JOB_RETRY_SCHEDULED, "job", job_id, study_uid=study_uid, error=error,
                         attempts=attempts, delay_seconds=delay)  # fmt: skip
        return "retrying"

    def run(self, job_id: int, work: Callable[[int], str]) -> str:
        """Claim the job and run ``work(job_id)``, which commits the job's success itself (in the
        transaction that records its results)."""
        if not self.claim(job_id):
            return "skipped"
        try:
            return work(job_id)
        except NotOurs:
            return "skipped"
        except PermanentJobError as exc:
            self.finish(job_id, error=str(exc))
            return "failed"
        except Exception as exc:  # transient until proven otherwise: a lost study is worse than a retry
            LOG.exception("job %d failed", job_id)
            return self.retry_or_fail(job_id, f"{type(exc).__name__}: {exc}"[:2000])

    @staticmethod
    def _study_uid(s: Session, job_id: int) -> str | None:
        return s.scalar(
            select(Study.study_uid)
            .join(StudyVersion, StudyVersion.study_id == Study.id)
            .join(Job, Job.study_version_id == StudyVersion.id)
            .where(Job.id == job_id)
        )
