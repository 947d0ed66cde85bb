"""Sending one output to one destination: claim the dispatch, one attempt by the output's kind,
record what the peer said.

Every attempt is a row with the per-item answers (for a DICOM SR, each instance's C-STORE status).
A transient failure (peer down, busy, timed out) schedules another attempt with exponential
backoff; a refusal, or running out of attempts, ends in ``failed``: visible in ``medcap
reports``, sent again by ``medcap resend``. When every destination has acknowledged a draft,
its job's ``acknowledged_at`` is set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import select

from service import dispatch_lifecycle as dispatches
from service import outputs
from service.clock import Clock
from service.database import Database
from service.outputs import Delivery, OutputKinds
from service.schema import Dispatch, DispatchAttempt, Output, SRDocument, Study

LOG = logging.getLogger(__name__)


class DispatchRunner:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        actor: str,
        *,
        kinds: OutputKinds,
        max_attempts: int,
        retry_delay: Callable[[int], float],
        stale_seconds: float,
    ) -> None:
        self.db = db
        self.clock = clock
        self.actor = actor
        self.kinds = kinds
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
            dispatch, output, sop_uid, study_uid = s.execute(
                select(Dispatch, Output, SRDocument.sop_instance_uid, Study.study_uid)
                .join(Output, Output.id == Dispatch.output_id)
                .join(SRDocument, SRDocument.id == Output.report_id)
                .join(Study, Study.id == SRDocument.study_id)
                .where(Dispatch.id == dispatch_id)
            ).one()
            destination, attempts, kind_name, artefact = dispatch.destination, dispatch.attempts, output.kind, outputs.artefact_of(output)
        started = self.clock.now()
        try:
            delivery = self.kinds.get(kind_name).send(artefact, destination)
        except LookupError as exc:  # an output kind this deployment no longer has
            delivery = Delivery(delivered=False, retryable=False, summary=str(exc))
        return self._record(dispatch_id, study_uid, sop_uid, attempts, started, delivery)

    def _record(self, dispatch_id: int, study_uid: str | None, sop_uid: str, attempts: int, started: datetime, delivery: Delivery) -> str:
        now = self.clock.now()
        if delivery.delivered:
            outcome = "delivered"
        elif delivery.retryable:
            outcome = "transient"
        else:
            outcome = "refused"
        error = None if delivery.delivered else delivery.summary
        instances = list(delivery.items)
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
