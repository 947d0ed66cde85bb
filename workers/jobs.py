"""Running a job: claim it atomically, do the work, record the outcome.

The claim is a conditional UPDATE, so a job delivered twice (broker redelivery, a stale
job re-published by the assembler) runs once, and a superseded job does not run at all.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from service import audit
from service.audit import Action
from service.clock import Clock
from service.database import Database
from service.schema import Job, JobStatus, Study, StudyVersion

LOG = logging.getLogger(__name__)


class JobRunner:
    def __init__(self, db: Database, clock: Clock, actor: str, stale_seconds: float) -> None:
        self.db = db
        self.clock = clock
        self.actor = actor
        self.stale = timedelta(seconds=stale_seconds)

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
                .values(status=status.value, finished_at=now, error=error)
            )
            action = Action.JOB_FAILED if error else Action.JOB_SUCCEEDED
            audit.record(s, now, self.actor, action, "job", job_id, study_uid=self._study_uid(s, job_id), error=error, **details)

    def run(self, job_id: int) -> str:
        """Run one caption job. Captioning itself arrives with the pipeline; until then the
        job records that a worker received and completed it."""
        if not self.claim(job_id):
            return "skipped"
        self.finish(job_id, result="recorded only: no captioner is installed in this release")
        return "succeeded"

    @staticmethod
    def _study_uid(s: Session, job_id: int) -> str | None:
        return s.scalar(
            select(Study.study_uid)
            .join(StudyVersion, StudyVersion.study_id == Study.id)
            .join(Job, Job.study_version_id == StudyVersion.id)
            .where(Job.id == job_id)
        )
