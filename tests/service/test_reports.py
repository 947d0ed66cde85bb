"""``medcap reports``: each job's draft SR and the verified report approved from it, with where each went."""

from __future__ import annotations

from datetime import datetime

from service.reports import list_reports
from service.schema import Dispatch, Job, Output, SRDocument
from tests import rows


def report_with_dispatches(s, now: datetime, of: SRDocument, *statuses: tuple[str, str]) -> None:
    output = Output(
        report_id=of.id, kind="hl7-oru", media_type="x-application/hl7-v2+er7", path="/nowhere", sha256="0" * 64, created_at=now
    )
    s.add(output)
    s.flush()
    for destination, status in statuses:
        s.add(Dispatch(output_id=output.id, destination=destination, status=status, attempts=1, created_at=now))


def approved_study(db, clock, verified_status: str) -> tuple[str, str]:
    now = clock.now()
    with db.session() as s:
        version = rows.version(s, now, rows.study(s, now, "2.25.1"))
        job = Job(study_version_id=version.id, status="succeeded", created_at=now)
        s.add(job)
        s.flush()
        draft = rows.draft_sr(s, now, version, job_id=job.id)
        verified = rows.draft_sr(
            s,
            now,
            version,
            kind="verified",
            idempotency_key=f"verified:{draft.id}",
            predecessor_id=draft.id,
            sop_instance_uid="2.25.77",
            verification_flag="VERIFIED",
            completion_flag="COMPLETE",
        )
        report_with_dispatches(s, now, draft, ("mllp://127.0.0.1:2575", "delivered"))
        report_with_dispatches(s, now, verified, ("mllp://127.0.0.1:2575", verified_status))
        return draft.sop_instance_uid, verified.sop_instance_uid


def test_the_verified_report_and_its_deliveries_are_listed_under_its_draft(db, clock):
    draft_uid, verified_uid = approved_study(db, clock, "delivered")
    (report,) = list_reports(db)
    assert (report.sr_uid, report.verified_sr_uid) == (draft_uid, verified_uid)
    assert [d.status for d in report.dispatches] == ["delivered"] and [d.status for d in report.verified_dispatches] == ["delivered"]
    assert report.describe().splitlines()[-2:] == [
        f"    verified SR {verified_uid}",
        "    -> mllp://127.0.0.1:2575: delivered after 1 attempt(s)",
    ]
    assert list_reports(db, failed_only=True) == []


def test_a_failed_delivery_of_the_verified_report_is_a_failed_report(db, clock):
    _, verified_uid = approved_study(db, clock, "failed")  # e.g. the RIS refused the ORU F
    (report,) = list_reports(db, failed_only=True)
    assert report.verified_sr_uid == verified_uid and [d.status for d in report.verified_dispatches] == ["failed"]
    assert report.as_dict()["verified_dispatches"][0]["status"] == "failed"
