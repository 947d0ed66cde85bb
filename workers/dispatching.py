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

from sqlalchemy import select

from dicom_io.store_scu import Destination, DispatchResult
from service import dispatch_lifecycle as dispatches
from service.clock import Clock
from service.database import Database
from service.schema import Dispatch, DispatchAttempt, SRDocument, Study

LOG = logging.getLogger(__name__)

Sender = Callable[[Destination, list[Path]], DispatchResult]


class DispatchRunner:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        actor: str,
        *,
        resolve: Callable[[str], Destination],
        sender: Sender,
        max_attempts: int,
        retry_delay: Callable[[int], float],
        stale_seconds: float,
    ) -> None:
        self.db = db
        self.clock = clock
        self.actor = actor
        self.resolve = resolve
        self.sender = sender
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        self.stale = timedelta(seconds=stale_seconds)

    def claim(self, dispatch_id: int) -> bool:
        with self.db.session() as s:
            return dispatches.claim(s, self.clock.now(), self.actor, dispatch_id, self.stale)

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

    def _record(
        self,
        dispatch_id: int,
        study_uid: str | None,
        sop_uid: str,
        attempts: int,
        started: object,
        result: DispatchResult | None,
        error: str | None,
    ) -> str:
        now = self.clock.now()
        if result is not None and result.delivered:
            outcome = "delivered"
        elif result is not None and result.retryable:
            outcome = "transient"
        else:
            outcome = "refused"
        error = error or (None if result is None or result.delivered else result.summary)
        instances = [
            {"sop_instance_uid": o.sop_instance_uid, "status": o.status, "category": str(o.category), "error": o.error}
            for o in (result.outcomes if result else ())
        ]
        with self.db.session() as s:
            s.add(
                DispatchAttempt(
                    dispatch_id=dispatch_id,
                    number=attempts,
                    started_at=started,
                    finished_at=now,
                    outcome=outcome,
                    error=error,
                    instances=instances,
                    worker=self.actor,
                )
            )
            common: dict[str, object] = dict(study_uid=study_uid, sr=sop_uid, attempt=attempts, instances=instances)
            if outcome == "delivered":
                dispatches.deliver(s, now, self.actor, dispatch_id, **common)
                status = "delivered"
            elif outcome == "transient" and attempts < self.max_attempts:
                dispatches.retry_later(s, now, self.actor, dispatch_id, error, self.retry_delay(attempts), **common)
                status = "retrying"
            else:
                if outcome == "transient":
                    error = f"gave up after {attempts} attempts: {error}"
                dispatches.fail(s, now, self.actor, dispatch_id, error, **common)
                status = "failed"
        (LOG.info if status == "delivered" else LOG.warning)(
            "dispatch %d of SR %s: %s%s", dispatch_id, sop_uid, status, f" ({error})" if error else ""
        )
        return status
