"""One study through every output, configured as a site would: received over C-STORE, drafted by the caption
step, its draft sent by STOW-RS to Orthanc, as ORU^R01 (P) to the RIS and as a preliminary DiagnosticReport;
approved, and the verified report sent the same ways (SR by STOW-RS, ORU F, DiagnosticReport final)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import timedelta

import pytest
from hl7apy.parser import parse_message
from sqlalchemy import select

from dicom_io.key_slices import KeySliceSpec
from service import dispatch_lifecycle as dispatches
from service import outputs
from service.review import Reviews
from service.schema import AuditEvent, Dispatch, Output, SRDocument
from service.users import Users
from tests.conftest import storescu
from tests.pipeline import CT, runner
from tests.service.outputs.dicomweb_orthanc import BASIC, DicomWebOrthanc
from tests.service.outputs.fhir_server import FhirServer
from tests.service.outputs.mllp_ris import Ris
from workers.dispatching import DispatchRunner
from workers.drafting import Drafter, DraftOptions


@pytest.fixture
def peers(tmp_path) -> Iterator[tuple[DicomWebOrthanc, Ris, FhirServer]]:
    archive, ris, fhir = DicomWebOrthanc(tmp_path), Ris(), FhirServer(token="ris-token")
    try:
        archive.start()
        ris.start()
        fhir.start()
        yield archive, ris, fhir
    finally:
        fhir.stop()
        ris.stop()
        archive.stop()


def send_all(db, clock, settings, kinds) -> dict[str, str]:
    """Run every due dispatch once, as the dispatch worker would: destination -> outcome."""
    send = DispatchRunner(
        db,
        clock,
        "worker:test",
        kinds=kinds,
        max_attempts=3,
        retry_delay=settings.retry_delay,
        stale_seconds=settings.dispatch_stale_seconds,
    )
    with db.session() as s:
        due = dispatches.due(s, clock.now(), timedelta(seconds=60))
        where = {d.id: d.destination for d in s.scalars(select(Dispatch))}
    return {where[item.dispatch_id]: send.run(item.dispatch_id) for item in due}


@pytest.mark.peers
def test_a_study_reaches_the_archive_and_the_ris_as_draft_then_as_verified_report(
    db, clock, make_settings, listener, assembler, captioner, peers
):
    archive, ris, fhir = peers
    settings = make_settings(  # the listener's data dir and database, and the three peers
        output_destinations=f"{archive.destination},{ris.destination},{fhir.destination}",
        stow_rs_authorization=BASIC,
        fhir_authorization="Bearer ris-token",
        hl7_receiving_application="RIS",
    )
    kinds = outputs.configured(settings)
    assert storescu(listener, CT).returncode == 0
    clock.advance(settings.quiet_seconds + 1)
    (job,) = assembler.tick()
    options = DraftOptions(
        key_slices=KeySliceSpec(strategy="uniform", n=3),
        destinations=settings.dispatch_destinations,
        storage=settings.storage,
        outputs=kinds,
    )
    assert runner(db, clock).run(job, Drafter(db, clock, captioner, options, "worker:test").draft) == "succeeded"
    assert send_all(db, clock, settings, kinds) == dict.fromkeys(settings.dispatch_destinations, "delivered")

    with db.session() as s:
        draft = s.scalars(select(SRDocument)).one()
    reviews = Reviews(
        db, clock, storage=settings.storage, destinations=settings.dispatch_destinations, organization="General Hospital", outputs=kinds
    )
    radiologist = Users(db, clock).add("smith", "Smith^Jane", "radiologist", "correct horse battery", "cli:test")
    clock.advance(120)
    verified_uid = reviews.approve(draft.id, radiologist)
    assert send_all(db, clock, settings, kinds) == dict.fromkeys(settings.dispatch_destinations, "delivered")

    # STOW-RS: both SRs are in Orthanc
    assert archive.instance(draft.sop_instance_uid).VerificationFlag == "UNVERIFIED"
    assert archive.instance(verified_uid).VerificationFlag == "VERIFIED"
    # HL7: P, then F, to the RIS named in the settings
    statuses = [parse_message(m, find_groups=False).obr.obr_25.value for m in ris.received]
    assert statuses == ["P", "F"] and all(parse_message(m, find_groups=False).msh.msh_5.value == "RIS" for m in ris.received)
    # FHIR: one DiagnosticReport, preliminary then final
    (report,) = fhir.resources.values()
    assert [v["status"] for v in fhir.history] == ["preliminary", "final"] and report["resultsInterpreter"][0]["display"] == "Jane Smith"
    assert "MedCap AI draft" in fhir.history[0]["presentedForm"][0]["title"] and base64.b64decode(report["presentedForm"][0]["data"])

    with db.session() as s:
        kinds_built = sorted((o.report_id == draft.id, o.kind) for o in s.scalars(select(Output)))
        delivered = s.scalars(select(AuditEvent.details).where(AuditEvent.action == "dispatch.delivered")).all()
    assert kinds_built == [(False, "fhir-diagnostic-report"), (False, "hl7-oru"), (False, "stow-rs")] + [
        (True, "fhir-diagnostic-report"),
        (True, "hl7-oru"),
        (True, "stow-rs"),
    ], "three outputs of each report, each built once"
    assert len(delivered) == 6 and all(d["attempt"] == 1 for d in delivered)
