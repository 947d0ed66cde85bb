"""Sending an SR to one destination: claim the dispatch, one association, record what the PACS said.

Every attempt is a row with the per-instance statuses. A transient failure (PACS down, busy,
timed out) schedules another attempt with exponential backoff; a refusal, or running out of
attempts, ends in ``failed``: visible in ``medcap reports``, sent again by ``medcap resend``.
When every destination has acknowledged a draft SR, its job's ``acknowledged_at`` is set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from sqlalchemy import and_, func, or_, select, update

from dicom_io.dispatch import Destination, DispatchResult
from service import audit
from service.audit import Action
from service.clock import Clock
from service.database import Database
from service.schema import Dispatch, DispatchAttempt, DispatchStatus, Job, SRDocument, SRKind, Study

LOG = logging.getLogger(__name__)

Sender = Callable[[Destination, list[Path]], DispatchResult]


class DispatchRunner:
    def __init__(self, db: Database, clock: Clock, actor: str, *, resolve: Callable[[str], Destination], sender: Sender,
                 max_attempts: int, retry_delay: Callable[[int], float], stale_seconds: float) -> None:  # fmt: skip
        self.db = db
        self.clock = clock
        self.actor = actor
        self.resolve = resolve
        self.sender = sender
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        self.stale = timedelta(seconds=stale_seconds)

    def claim(self, dispatch_id: int) -> bool:
        now = self.clock.now()
        with self.db.session() as s:
            claimed = s.execute(
                update(Dispatch)
                .where(
                    Dispatch.id == dispatch_id,
                    or_(
                        Dispatch.status.in_([DispatchStatus.PENDING, DispatchStatus.ENQUEUED]),
                        and_(Dispatch.status == DispatchStatus.RETRYING, Dispatch.next_attempt_at <= now),
                        and_(Dispatch.status == DispatchStatus.SENDING, Dispatch.started_at < now - self.stale),
                    ),
                )
                .values(status=DispatchStatus.SENDING.value, started_at=now, attempts=Dispatch.attempts + 1)
            ).rowcount  # type: ignore[attr-defined]
            if not claimed:
                status = s.scalar(select(Dispatch.status).where(Dispatch.id == dispatch_id))
                audit.record(s, now, self.actor, Action.DISPATCH_SKIPPED, "dispatch", dispatch_id, status=status or "missing")
        return bool(claimed)

    def run(self, dispatch_id: int) -> str:
        if not self.claim(dispatch_id):
            return "skipped"
        with self.db.session() as s:
            dispatch = s.get(Dispatch, dispatch_id)
            doc = s.get(SRDocument, dispatch.sr_document_id)  # type: ignore[union-attr]
            study_uid = s.scalar(select(Study.study_uid).where(Study.id == doc.study_id))  # type: ignore[union-attr]
            destination_text, attempts, path, sop_uid = dispatch.destination, dispatch.attempts, Path(doc.path), doc.sop_instance_uid  # type: ignore[union-attr]
        started = self.clock.now()
        error: str | None = None
        result: DispatchResult | None = None
        try:
            destination = self.resolve(destination_text)
            if not path.is_file():
                error = f"the SR file {path} is missing"
            else:
                result = self.sender(destination, [path])
        except ValueError as exc:  # a destination no longer parseable, TLS files gone
            error = str(exc)
        return self._record(dispatch_id, study_uid, sop_uid, attempts, started, result, error)

    def _record(self, dispatch_id: int, study_uid: str | None, sop_uid: str, attempts: int, started: object,
                result: DispatchResult | None, error: str | None) -> str:  # fmt: skip
        now = self.clock.now()
        if result is not None and result.delivered:
            outcome = "delivered"
        elif result is not None and result.retryable:
            outcome = "transient"
        else:
            outcome = "refused"
        error = error or (None if result is None or result.delivered else result.summary)
        instances = [{"sop_instance_uid": o.sop_instance_uid, "status": o.status, "category": str(o.category), "error": o.error}
                     for o in (result.outcomes if result else ())]  # fmt: skip
        with self.db.session() as s:
            s.add(DispatchAttempt(dispatch_id=dispatch_id, number=attempts, started_at=started, finished_at=now, outcome=outcome,
                                  error=error, instances=instances, worker=self.actor))  # fmt: skip
            common = dict(study_uid=study_uid, sr=sop_uid, attempt=attempts, instances=instances)
            mine = and_(Dispatch.id == dispatch_id, Dispatch.status == DispatchStatus.SENDING)
            if outcome == "delivered":
                s.execute(update(Dispatch).where(mine).values(status=DispatchStatus.DELIVERED.value, delivered_at=now, error=None))
                audit.record(s, now, self.actor, Action.DISPATCH_DELIVERED, "dispatch", dispatch_id, **common)  # type: ignore[arg-type]
                self._acknowledge_job(s, dispatch_id, now)
                status = "delivered"
            elif outcome == "transient" and attempts < self.max_attempts:
                delay = self.retry_delay(attempts)
                s.execute(update(Dispatch).where(mine).values(status=DispatchStatus.RETRYING.value, error=error,
                                                              next_attempt_at=now + timedelta(seconds=delay)))  # fmt: skip
                audit.record(s, now, self.actor, Action.DISPATCH_RETRY_SCHEDULED, "dispatch", dispatch_id, error=error,  # type: ignore[arg-type]
                             delay_seconds=delay, **common)  # fmt: skip
                status = "retrying"
            else:
                if outcome == "transient":
                    error = f"gave up after {attempts} attempts: {error}"
                s.execute(update(Dispatch).where(mine).values(status=DispatchStatus.FAILED.value, error=error))
                audit.record(s, now, self.actor, Action.DISPATCH_FAILED, "dispatch", dispatch_id, error=error, **common)  # type: ignore[arg-type]
                status = "failed"
        (LOG.info if status == "delivered" else LOG.warning)("dispatch %d of SR %s: %s%s", dispatch_id, sop_uid, status,
                                                             f" ({error})" if error else "")  # fmt: skip
        return status

    @staticmethod
    def _acknowledge_job(s: object, dispatch_id: int, now: object) -> None:
        """The job's last milestone: every destination of its draft SR has the report."""
        doc_id = s.scalar(select(Dispatch.sr_document_id).where(Dispatch.id == dispatch_id))  # type: ignore[attr-defined]
        open_ = s.scalar(select(func.count()).where(Dispatch.sr_document_id == doc_id, Dispatch.status != DispatchStatus.DELIVERED))  # type: ignore[attr-defined]
        if open_:
            return
        job_id = s.scalar(select(SRDocument.job_id).where(SRDocument.id == doc_id, SRDocument.kind == SRKind.DRAFT))  # type: ignore[attr-defined]
        if job_id is not None:
            s.execute(update(Job).where(Job.id == job_id, Job.acknowledged_at.is_(None)).values(acknowledged_at=now))  # type: ignore[attr-defined]
