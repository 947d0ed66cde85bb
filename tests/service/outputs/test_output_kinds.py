"""Output kinds: the interface, the registry, the outputs a report gets, and a second kind end to end
(built, dispatched, sent, retried and failed through the same lifecycle and runner as the SR)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from service import dispatch_lifecycle as dispatches
from service import outputs
from service.outputs import Artefact, Delivery, DicomSR, OutputKind, OutputKinds
from service.schema import AuditEvent, Dispatch, DispatchAttempt, Output, SRDocument, Study, StudyVersion
from service.storage import Storage
from workers.dispatching import DispatchRunner

PACS = "PACS@127.0.0.1:104"


class FolderDrop(OutputKind):
    """A second kind, as a site might add one: the report's file copied into a folder (``folder:/path``)."""

    name = "folder"
    media_type = "application/dicom"

    def __init__(self) -> None:
        self.answer: Delivery | None = None  # set by a test to play a peer that is down or refuses

    def accepts(self, destination: str) -> bool:
        return destination.startswith("folder:")

    def build(self, report: SRDocument) -> Artefact:
        return Artefact(Path(report.path), self.media_type, report.sha256)

    def send(self, artefact: Artefact, destination: str) -> Delivery:
        if self.answer is not None:
            return self.answer
        folder = Path(destination.removeprefix("folder:"))
        shutil.copyfile(artefact.path, folder / artefact.path.name)
        return Delivery(delivered=True, retryable=False, summary=f"copied to {folder}", items=({"file": artefact.path.name},))


def make_report(db, clock, tmp_path: Path) -> int:
    """A report row with a file behind it (what drafting or a review writes)."""
    now = clock.now()
    path = tmp_path / "report.dcm"
    path.write_bytes(b"not really DICOM, the folder kind does not care")
    with db.session() as s:
        study = Study(study_uid="1.2.826.0.1.3680043.2.1", first_received_at=now)
        s.add(study)
        s.flush()
        version = StudyVersion(study_id=study.id, number=1, created_at=now, trigger="stable", instance_count=1, captionable_count=1)
        s.add(version)
        s.flush()
        doc = SRDocument(
            kind="draft",
            idempotency_key="draft:1",
            study_id=study.id,
            study_version_id=version.id,
            sop_instance_uid="2.25.1234",
            series_uid="2.25.5678",
            completion_flag="PARTIAL",
            verification_flag="UNVERIFIED",
            path=str(path),
            sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
            created_at=now,
            created_by="worker:test",
        )
        s.add(doc)
        s.flush()
        return doc.id


def runner(db, clock, kinds: OutputKinds, max_attempts: int = 3) -> DispatchRunner:
    return DispatchRunner(db, clock, "worker:test", kinds=kinds, max_attempts=max_attempts, retry_delay=lambda n: 10.0, stale_seconds=60)


def test_artefacts_and_deliveries_are_checked_on_construction():
    with pytest.raises(ValueError, match="Artefact.media_type"):
        Artefact(Path("x"), "dicom", "0" * 64)
    with pytest.raises(ValueError, match="Artefact.sha256"):
        Artefact(Path("x"), "application/dicom", "abc")
    with pytest.raises(TypeError, match="Artefact.path"):
        Artefact(3, "application/dicom", "0" * 64)
    with pytest.raises(ValueError, match="Delivery.retryable"):
        Delivery(delivered=True, retryable=True, summary="both")
    with pytest.raises(ValueError, match="Delivery.summary"):
        Delivery(delivered=False, retryable=True, summary="")


def test_each_destination_finds_its_kind():
    kinds = OutputKinds([DicomSR(), FolderDrop()])
    assert kinds.for_destination(PACS).name == "dicom-sr"
    assert kinds.for_destination("PACS@[::1]:11112").name == "dicom-sr"
    assert kinds.for_destination("folder:/srv/drop").name == "folder"
    with pytest.raises(ValueError, match="'https://ris.example/fhir' is not one of any output kind's \\(dicom-sr, folder\\)"):
        kinds.for_destination("https://ris.example/fhir")
    with pytest.raises(LookupError, match="no output kind 'hl7'"):
        kinds.get("hl7")
    with pytest.raises(ValueError, match="names must be unique"):
        OutputKinds([DicomSR(), DicomSR()])
    with pytest.raises(ValueError, match="at least one"):
        OutputKinds([])


def test_the_configured_kinds_come_from_the_settings(make_settings):
    kinds = outputs.configured(make_settings(destinations=PACS))
    assert [k.name for k in kinds] == ["dicom-sr", "stow-rs", "hl7-oru", "fhir-diagnostic-report"]


def test_a_new_kind_is_built_once_dispatched_and_sent_by_the_same_lifecycle(db, clock, tmp_path):
    report_id = make_report(db, clock, tmp_path)
    drop_a, drop_b = tmp_path / "a", tmp_path / "b"
    drop_a.mkdir(), drop_b.mkdir()
    folder = FolderDrop()
    kinds = OutputKinds([DicomSR(), folder])
    with db.session() as s:
        report = s.get(SRDocument, report_id)
        created = dispatches.create_all(
            s, clock.now(), "worker:test", report, "1.2.3", [PACS, f"folder:{drop_a}", f"folder:{drop_b}"], kinds
        )
        ids = [d.id for d in created]
    with db.session() as s:
        built = {o.kind: o for o in s.scalars(select(Output))}
        output_of = {d.destination: d.output_id for d in s.scalars(select(Dispatch))}
        events = [e.details["kind"] for e in s.scalars(select(AuditEvent).where(AuditEvent.action == "output.built"))]
    assert sorted(built) == ["dicom-sr", "folder"] and sorted(events) == ["dicom-sr", "folder"], "one output per kind, built once"
    assert output_of[f"folder:{drop_a}"] == output_of[f"folder:{drop_b}"] == built["folder"].id != output_of[PACS]
    assert built["folder"].path == str(tmp_path / "report.dcm") and built["folder"].media_type == "application/dicom"

    # The folder dispatches are sent by the same runner, with the same statuses and attempt records.
    assert runner(db, clock, kinds).run(ids[1]) == "delivered"
    assert (drop_a / "report.dcm").read_bytes() == (tmp_path / "report.dcm").read_bytes()
    folder.answer = Delivery(delivered=False, retryable=True, summary="share offline")
    assert runner(db, clock, kinds).run(ids[2]) == "retrying"
    clock.advance(11)
    folder.answer = Delivery(delivered=False, retryable=False, summary="permission denied")
    assert runner(db, clock, kinds).run(ids[2]) == "failed"
    with db.session() as s:
        statuses = {d.destination: (d.status, d.attempts, d.error) for d in s.scalars(select(Dispatch))}
        attempts = [
            (a.dispatch_id, a.outcome, a.error, a.instances) for a in s.scalars(select(DispatchAttempt).order_by(DispatchAttempt.id))
        ]
    assert statuses[f"folder:{drop_a}"] == ("delivered", 1, None)
    assert statuses[f"folder:{drop_b}"] == ("failed", 2, "permission denied")
    assert statuses[PACS] == ("pending", 0, None)
    assert attempts == [
        (ids[1], "delivered", None, [{"file": "report.dcm"}]),
        (ids[2], "transient", "share offline", []),
        (ids[2], "refused", "permission denied", []),
    ]

    # A deployment that dropped the kind fails its dispatches with a clear error instead of crashing the worker.
    with db.session() as s:
        dispatches.resend(s, clock.now(), "cli:test", s.get(Dispatch, ids[2]), force=False, study_uid="1.2.3", sr_uid="2.25.1234")
    assert runner(db, clock, OutputKinds([DicomSR()])).run(ids[2]) == "failed"
    with db.session() as s:
        assert s.get(Dispatch, ids[2]).error == "no output kind 'folder' is configured (known: dicom-sr)"


def test_the_sr_kind_fails_a_missing_file_and_an_unusable_destination_without_sending(tmp_path):
    sent: list[object] = []
    kind = DicomSR(sender=lambda destination, paths: sent.append(paths), storage=Storage(tmp_path))
    artefact = Artefact(tmp_path / "gone.dcm", "application/dicom", "0" * 64)
    assert kind.send(artefact, PACS) == Delivery(False, False, f"the SR file {tmp_path / 'gone.dcm'} is missing")
    assert "must look like AE_TITLE@host:port" in kind.send(artefact, "nonsense").summary
    elsewhere = Artefact(tmp_path.parent / "not-ours.dcm", "application/dicom", "0" * 64)  # a recorded path outside the data dir
    assert "outside the data directory" in kind.send(elsewhere, PACS).summary
    assert sent == []
