"""A real report to send (the draft the drafting step wrote from received CT images, and the verified SR
a radiologist makes of it), and the dispatch runner the dispatch worker uses."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from service import dispatch_lifecycle as dispatches
from service.outputs import OutputKind, OutputKinds
from service.outputs.report_facts import Model, ReportFacts, ResultStatus, SeriesText
from service.review import Reviews
from service.schema import AuditEvent, Dispatch, DispatchAttempt, SRDocument, Study
from service.users import Users
from workers.dispatching import DispatchRunner


@pytest.fixture
def approve(db, clock, settings) -> Callable[[int], int]:
    """Approve a draft as radiologist Smith^Jane, with no destinations: the verified report's id."""
    reviews = Reviews(db, clock, storage=settings.storage, destinations=[], organization="General Hospital")
    radiologist = Users(db, clock).add("smith", "Smith^Jane", "radiologist", "correct horse battery", "cli:test")

    def run(draft_id: int) -> int:
        clock.advance(60)
        uid = reviews.approve(draft_id, radiologist)
        with db.session() as s:
            return int(s.scalar(select(SRDocument.id).where(SRDocument.sop_instance_uid == uid)))

    return run


def dispatch(db, clock, report_id: int, destination: str, kind: OutputKind) -> int:
    """A pending dispatch of the report to ``destination`` (its output built by ``kind``), as drafting and review create them."""
    with db.session() as s:
        report = s.get(SRDocument, report_id)
        study_uid = s.scalar(select(Study.study_uid).where(Study.id == report.study_id))
        (created,) = dispatches.create_all(s, clock.now(), "worker:test", report, study_uid, [destination], OutputKinds([kind]))
        return int(created.id)


def sender(db, clock, kind: OutputKind, max_attempts: int = 3) -> DispatchRunner:
    return DispatchRunner(
        db, clock, "worker:test", kinds=OutputKinds([kind]), max_attempts=max_attempts, retry_delay=lambda n: 10.0, stale_seconds=60
    )


def history(db, dispatch_id: int) -> tuple[tuple[str, int, str | None], list[tuple[str, str | None]], list[str]]:
    """(status, attempts, error), [(outcome, error)] per attempt, and the dispatch's audit actions."""
    with db.session() as s:
        row = s.get(Dispatch, dispatch_id)
        attempts = s.scalars(select(DispatchAttempt).where(DispatchAttempt.dispatch_id == dispatch_id).order_by(DispatchAttempt.number))
        events = s.scalars(
            select(AuditEvent.action)
            .where(AuditEvent.object_type == "dispatch", AuditEvent.object_id == str(dispatch_id))
            .order_by(AuditEvent.id)
        )
        return (row.status, row.attempts, row.error), [(a.outcome, a.error) for a in attempts], list(events)


def attempt_items(db, dispatch_id: int) -> list[list[dict]]:
    with db.session() as s:
        attempts = s.scalars(select(DispatchAttempt).where(DispatchAttempt.dispatch_id == dispatch_id).order_by(DispatchAttempt.number))
        return [list(a.instances) for a in attempts]


def facts(status: ResultStatus, verifier: str | None) -> ReportFacts:
    """A report's facts with everything a real study may hold: an accession number, delimiters and non-ASCII text, two series."""
    return ReportFacts(
        sop_instance_uid="2.25.1",
        study_uid="1.2.3.4",
        accession_number="ACC|42",
        patient_id="P-77",
        patient_name="Müller^Anna^B^Dr^",
        patient_birth_date=datetime(1970, 5, 1).date(),
        patient_sex="F",
        study_date=datetime(2026, 1, 2).date(),
        observed_at=datetime(2026, 1, 2, 10, 0, tzinfo=UTC),
        status=status,
        findings=(SeriesText("1.2.3.4.1", "No bleed.\nVentricles normal | symmetric."), SeriesText("1.2.3.4.2", "T1 & T2 ^ fine")),
        impression="Normal.",
        model=Model("MedCap", "MSMedCap", "0.1.0", "2.25.5"),
        verifier_name=verifier,
        verified_at=datetime(2026, 1, 2, 11, 0, tzinfo=UTC) if verifier else None,
    )
