"""Sending draft SRs to real peers: Orthanc as the PACS, dcmtk's storescp as a PACS that is down,
comes back, or refuses; every attempt and transition in the database."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from dicom_io.store_scu import send
from service.outputs import DicomSR, OutputKinds
from service.reports import RequeueError, list_reports, resend_report
from service.schema import AuditEvent, Dispatch, DispatchAttempt, Job, SRDocument
from tests.conftest import ORTHANC_AET, delete_srs, free_port, wait_until
from tests.tiers import requires
from tests.workers.conftest import CT, make_drafter, runner
from workers.dispatching import DispatchRunner


class StoreSCP:
    """dcmtk's storescp on a port of its own: a PACS we can stop, start, or make refuse."""

    def __init__(self, port: int, directory: Path) -> None:
        self.port, self.directory = port, directory
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *options: str) -> None:
        requires("peers")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["storescp", "-aet", "PACS", "-od", str(self.directory), *options, str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._accepting, "storescp to listen", timeout=30)

    def _accepting(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, "storescp exited"
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    server = StoreSCP(free_port(), tmp_path / "pacs")
    yield server
    server.stop()


def draft_for(db, clock, settings, captioner, job_id, destination: str) -> SRDocument:
    assert runner(db, clock).run(job_id, make_drafter(db, clock, captioner, settings, destinations=[destination]).draft) == "succeeded"
    with db.session() as s:
        return s.scalars(select(SRDocument)).one()


def dispatcher(db, clock, settings, max_attempts: int = 3) -> DispatchRunner:
    return DispatchRunner(
        db,
        clock,
        "worker:test",
        kinds=OutputKinds([DicomSR(settings.destination, lambda d, paths: send(d, paths, timeout=5), storage=settings.storage)]),
        max_attempts=max_attempts,
        retry_delay=lambda n: 30.0 * n,
        stale_seconds=120,
    )


def dispatch_row(db) -> Dispatch:
    with db.session() as s:
        return s.scalars(select(Dispatch)).one()


@pytest.fixture
def clean_orthanc(orthanc):
    """The session's Orthanc, left without the SRs this module sends (other modules push its studies)."""
    yield orthanc
    delete_srs(orthanc)


def test_the_draft_sr_reaches_orthanc_and_the_job_is_acknowledged(db, clock, settings, captioner, job_id, clean_orthanc):
    orthanc = clean_orthanc
    doc = draft_for(db, clock, settings, captioner, job_id, f"{ORTHANC_AET}@127.0.0.1:{orthanc.dicom_port}")
    dispatch = dispatch_row(db)
    assert dispatcher(db, clock, settings).run(dispatch.id) == "delivered"
    assert dispatcher(db, clock, settings).run(dispatch.id) == "skipped", "a redelivered dispatch does not send twice"

    (found,) = orthanc.request("POST", "/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": doc.sop_instance_uid}})
    tags = orthanc.request("GET", f"/instances/{found}/simplified-tags")
    assert (tags["Modality"], tags["CompletionFlag"], tags["VerificationFlag"], tags["PreliminaryFlag"]) == (
        "SR",
        "PARTIAL",
        "UNVERIFIED",
        "PRELIMINARY",
    )
    with db.session() as s:
        job = s.get(Job, job_id)
        (attempt,) = s.scalars(select(DispatchAttempt)).all()
        acts = list(s.scalars(select(AuditEvent.action).where(AuditEvent.object_type == "dispatch").order_by(AuditEvent.id)))
    assert tags["StudyInstanceUID"] == pydicom.dcmread(CT[0]).StudyInstanceUID
    assert job.acknowledged_at is not None and job.acknowledged_at >= job.sr_written_at
    assert (attempt.outcome, attempt.instances[0]["status"], attempt.instances[0]["category"]) == ("delivered", 0, "success")
    assert acts == ["dispatch.queued", "dispatch.delivered", "dispatch.skipped"]


@pytest.mark.peers
def test_a_pacs_that_is_down_gets_retries_with_backoff_until_it_is_back(
    db, clock, settings, captioner, job_id, storescp, assembler, publisher
):
    doc = draft_for(db, clock, settings, captioner, job_id, f"PACS@127.0.0.1:{storescp.port}")
    dispatch = dispatch_row(db)
    assert assembler.publish_dispatches() == 1 and publisher.dispatches == [dispatch.id]
    assert dispatcher(db, clock, settings).run(dispatch.id) == "retrying"
    row = dispatch_row(db)
    assert (row.status, row.attempts) == ("retrying", 1) and "connection" in row.error.lower()
    assert row.next_attempt_at == clock.now() + timedelta(seconds=30)
    assert assembler.publish_dispatches() == 0 and dispatcher(db, clock, settings).run(dispatch.id) == "skipped"

    clock.advance(30)
    assert dispatcher(db, clock, settings).run(dispatch.id) == "retrying"  # still down; now 60 s
    assert dispatch_row(db).next_attempt_at == clock.now() + timedelta(seconds=60)
    storescp.start()
    clock.advance(60)
    assert assembler.publish_dispatches() == 1
    assert dispatcher(db, clock, settings).run(dispatch.id) == "delivered"
    assert [p.name.split(".", 1)[1] for p in storescp.directory.iterdir()] == [doc.sop_instance_uid]
    with db.session() as s:
        outcomes = list(s.scalars(select(DispatchAttempt.outcome).order_by(DispatchAttempt.id)))
        assert s.get(Job, job_id).acknowledged_at is not None
    assert outcomes == ["transient", "transient", "delivered"]


@pytest.mark.peers
def test_a_pacs_that_refuses_leaves_a_visible_failed_dispatch_that_can_be_resent(db, clock, settings, captioner, job_id, storescp):
    storescp.start("--refuse")
    destination = f"PACS@127.0.0.1:{storescp.port}"
    doc = draft_for(db, clock, settings, captioner, job_id, destination)
    dispatch = dispatch_row(db)
    assert dispatcher(db, clock, settings).run(dispatch.id) == "failed"
    row = dispatch_row(db)
    assert row.status == "failed" and row.attempts == 1 and "rejected" in row.error
    (report,) = list_reports(db, failed_only=True)
    assert report.sr_uid == doc.sop_instance_uid and report.dispatches[0].status == "failed"
    with db.session() as s:
        event = s.scalars(select(AuditEvent).where(AuditEvent.action == "dispatch.failed")).one()
        assert s.get(Job, job_id).acknowledged_at is None
    assert "rejected" in event.details["error"]

    storescp.stop()
    storescp.start()  # the PACS administrator fixed it
    assert resend_report(db, clock, doc.sop_instance_uid, [destination], "cli:test") == [destination]
    assert dispatcher(db, clock, settings).run(dispatch.id) == "delivered"
    with pytest.raises(RequeueError, match="nothing to resend"):
        resend_report(db, clock, doc.sop_instance_uid, [destination], "cli:test")
    assert resend_report(db, clock, doc.sop_instance_uid, [destination], "cli:test", force=True) == [destination]
    assert list_reports(db, failed_only=True) == []


@pytest.mark.peers
def test_a_pacs_down_for_longer_than_the_attempts_ends_failed(db, clock, settings, captioner, job_id):
    draft_for(db, clock, settings, captioner, job_id, f"PACS@127.0.0.1:{free_port()}")
    dispatch = dispatch_row(db)
    runner_ = dispatcher(db, clock, settings, max_attempts=2)
    assert runner_.run(dispatch.id) == "retrying"
    clock.advance(30)
    assert runner_.run(dispatch.id) == "failed"
    assert dispatch_row(db).error.startswith("gave up after 2 attempts")


@pytest.mark.peers
def test_a_missing_sr_file_fails_the_dispatch_with_the_reason(db, clock, settings, captioner, job_id, storescp):
    doc = draft_for(db, clock, settings, captioner, job_id, f"PACS@127.0.0.1:{storescp.port}")
    Path(doc.path).unlink()
    assert dispatcher(db, clock, settings).run(dispatch_row(db).id) == "failed"
    assert "missing" in dispatch_row(db).error
