"""What became of each caption job and its SR, and the operator's two levers: retry and resend.

``medcap reports`` shows jobs with their draft SR, the verified report approved from it, and where
each went (the verified report's ORU F or final DiagnosticReport can fail too); ``medcap retry`` queues a
failed job again; ``medcap resend`` queues an SR for its destinations again. Both are audited in
the transaction that changes the state, and the assembler publishes what they queued.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import exists, or_, select
from sqlalchemy.orm import aliased

from service import audit, outputs
from service import dispatch_lifecycle as dispatches
from service import job_lifecycle as jobs
from service.audit import Action
from service.clock import Clock
from service.database import Database
from service.outputs import OutputKinds
from service.schema import Dispatch, DispatchStatus, Job, JobStatus, Output, SRDocument, Study, StudyVersion


class RequeueError(ValueError):
    """The job or SR cannot be queued again (unknown, or in a state that forbids it)."""


@dataclass(frozen=True)
class DispatchState:
    destination: str
    status: str
    attempts: int
    error: str | None


@dataclass(frozen=True)
class ReportStatus:
    job_id: int
    study_uid: str
    accession_number: str | None
    version: int
    job_status: str
    job_error: str | None
    created_at: datetime
    acknowledged_at: datetime | None
    sr_uid: str | None
    dispatches: list[DispatchState] = field(default_factory=list)
    verified_sr_uid: str | None = None  # the report a radiologist approved from the draft
    verified_dispatches: list[DispatchState] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        line = f"job {self.job_id}  study {self.study_uid} v{self.version}  accession {self.accession_number or '-'}  {self.job_status}"
        if self.job_error:
            line += f": {self.job_error}"
        if self.sr_uid:
            line += f"\n    SR {self.sr_uid}"
        for d in self.dispatches:
            line += f"\n    -> {d.destination}: {d.status} after {d.attempts} attempt(s)" + (f": {d.error}" if d.error else "")
        if self.verified_sr_uid:
            line += f"\n    verified SR {self.verified_sr_uid}"
        for d in self.verified_dispatches:
            line += f"\n    -> {d.destination}: {d.status} after {d.attempts} attempt(s)" + (f": {d.error}" if d.error else "")
        return line


def list_reports(db: Database, *, failed_only: bool = False, limit: int = 50) -> list[ReportStatus]:
    verified = aliased(SRDocument)  # job_id is None on a verified SR: it hangs off its draft
    with db.session() as s:
        query = (
            select(
                Job,
                Study.study_uid,
                Study.accession_number,
                StudyVersion.number,
                SRDocument.id,
                SRDocument.sop_instance_uid,
                verified.id,
                verified.sop_instance_uid,
            )
            .join(StudyVersion, StudyVersion.id == Job.study_version_id)
            .join(Study, Study.id == StudyVersion.study_id)
            .outerjoin(SRDocument, (SRDocument.job_id == Job.id) & (SRDocument.kind == "draft"))
            .outerjoin(verified, (verified.predecessor_id == SRDocument.id) & (verified.kind == "verified"))
            .order_by(Job.id.desc())
            .limit(limit)
        )
        if failed_only:
            failed_dispatch = exists().where(
                or_(Output.report_id == SRDocument.id, Output.report_id == verified.id),
                Dispatch.output_id == Output.id,
                Dispatch.status == DispatchStatus.FAILED,
            )
            query = query.where(or_(Job.status == JobStatus.FAILED, failed_dispatch))
        rows = s.execute(query).all()
        doc_ids = [doc_id for row in rows for doc_id in (row[4], row[6]) if doc_id is not None]
        dispatches: dict[int, list[DispatchState]] = {}
        for report_id, d in s.execute(
            select(Output.report_id, Dispatch)
            .join(Output, Output.id == Dispatch.output_id)
            .where(Output.report_id.in_(doc_ids))
            .order_by(Dispatch.id)
        ):
            dispatches.setdefault(report_id, []).append(DispatchState(d.destination, d.status, d.attempts, d.error))
    return [
        ReportStatus(
            job.id,
            study_uid,
            accession,
            number,
            job.status,
            job.error,
            job.created_at,
            job.acknowledged_at,
            sr_uid,
            dispatches.get(doc_id, []) if doc_id else [],
            verified_uid,
            dispatches.get(verified_id, []) if verified_id else [],
        )
        for job, study_uid, accession, number, doc_id, sr_uid, verified_id, verified_uid in rows
    ]


def retry_job(db: Database, clock: Clock, job_id: int, actor: str) -> None:
    """Queue a failed job again with fresh attempts."""
    with db.session() as s:
        try:
            jobs.requeue(s, clock.now(), actor, job_id)
        except LookupError as exc:
            raise RequeueError(str(exc)) from None
        except jobs.ForbiddenTransition:
            raise RequeueError(
                f"job {job_id} is {s.scalar(select(Job.status).where(Job.id == job_id))}; only failed jobs are retried"
            ) from None


def resend_report(
    db: Database,
    clock: Clock,
    sop_instance_uid: str,
    destinations: Sequence[str],
    actor: str,
    *,
    force: bool = False,
    kinds: OutputKinds | None = None,
) -> list[str]:
    """Queue a report for ``destinations``: ones never tried get a new dispatch (of the output of
    the destination's kind); failed (or, with ``force``, any finished) dispatches start over.
    Returns the destinations queued."""
    kinds = kinds or outputs.default()
    now = clock.now()
    if not destinations:
        raise RequeueError("no destination: set MEDCAP_DESTINATIONS or pass --destination AE@host:port")
    with db.session() as s:
        doc = s.scalar(select(SRDocument).where(SRDocument.sop_instance_uid == sop_instance_uid))
        if doc is None:
            raise RequeueError(f"there is no SR {sop_instance_uid}")
        study_uid = s.scalar(select(Study.study_uid).where(Study.id == doc.study_id))
        existing = {
            d.destination: d
            for d in s.scalars(select(Dispatch).join(Output, Output.id == Dispatch.output_id).where(Output.report_id == doc.id))
        }
        queued = []
        for destination in destinations:
            dispatch = existing.get(destination)
            if dispatch is None:  # a destination it never went to: a new dispatch
                created = dispatches.create(s, now, actor, doc, destination, study_uid, kinds)
                audit.record(
                    s,
                    now,
                    actor,
                    Action.DISPATCH_RESEND_REQUESTED,
                    "dispatch",
                    created.id,
                    study_uid=study_uid,
                    sr=sop_instance_uid,
                    destination=destination,
                )
            elif not dispatches.resend(s, now, actor, dispatch, force=force, study_uid=study_uid, sr_uid=sop_instance_uid):
                continue
            queued.append(destination)
        if not queued:
            states = ", ".join(f"{d}: {existing[d].status}" for d in destinations if d in existing)
            raise RequeueError(f"SR {sop_instance_uid}: nothing to resend ({states}); pass --destination to send a delivered SR again")
    return queued
