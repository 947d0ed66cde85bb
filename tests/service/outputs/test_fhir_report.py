"""The FHIR DiagnosticReport kind: resources built from real draft and verified SRs, sent to a real HTTP
FHIR server run by the test (tests/service/outputs/fhir_server.py, validating each resource with the
FHIR R4(B) models) through the dispatch lifecycle and runner."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from sqlalchemy import select

from service.outputs import FhirReport
from service.outputs.fhir_report import diagnostic_report
from service.outputs.http_peer import HttpPeer
from service.outputs.report_facts import ResultStatus
from service.schema import Output, SRDocument, Study
from tests.service.outputs.conftest import attempt_items, dispatch, facts, history, sender
from tests.service.outputs.fhir_server import FhirServer

SYSTEM = "urn:example:reports"


@pytest.fixture
def fhir() -> Iterator[FhirServer]:
    server = FhirServer()
    yield server
    server.stop()


def kind(settings, authorization: str | None = None) -> FhirReport:
    return FhirReport(HttpPeer(authorization, timeout=5), identifier_system=SYSTEM, storage=settings.storage)


def contained(resource: dict, type_: str) -> list[dict]:
    return [c for c in resource.get("contained", []) if c["resourceType"] == type_]


# -- the resource ---------------------------------------------------------------------------------


def test_the_preliminary_and_final_resources_follow_imaging_diagnostic_report():
    draft = json.loads(diagnostic_report(facts(ResultStatus.PRELIMINARY, None), SYSTEM).model_dump_json(exclude_none=True))
    final = json.loads(diagnostic_report(facts(ResultStatus.FINAL, "Smith^Jane^^Dr"), SYSTEM).model_dump_json(exclude_none=True))
    corrected = diagnostic_report(facts(ResultStatus.CORRECTED, "Smith^Jane"), SYSTEM)
    assert (draft["status"], final["status"], corrected.status) == ("preliminary", "final", "corrected")
    for resource in (draft, final):
        DiagnosticReport.model_validate(resource)  # what a FHIR server gets is a valid R4 DiagnosticReport
        assert resource["identifier"] == [{"system": SYSTEM, "value": "1.2.3.4"}], "one identifier for the draft and the final report"
        assert resource["conclusion"] == "Normal."
        assert resource["imagingStudy"] == [{"type": "ImagingStudy", "identifier": {"system": "urn:dicom:uid", "value": "urn:oid:1.2.3.4"}}]
        assert (
            resource["basedOn"][0]["identifier"]["value"] == "ACC|42"
            and resource["basedOn"][0]["identifier"]["type"]["coding"][0]["code"] == "ACSN"
        )
        assert resource["subject"] == {"type": "Patient", "identifier": {"value": "P-77"}, "display": "Dr Anna B Müller"}
        assert resource["code"]["coding"][0]["code"] == "18748-4"
        (device,) = contained(resource, "Device")
        assert device["identifier"][0]["value"] == "urn:oid:2.25.5" and device["deviceName"][0]["name"] == "MSMedCap"
        observations = contained(resource, "Observation")
        assert [o["valueString"] for o in observations] == ["No bleed.\nVentricles normal | symmetric.", "T1 & T2 ^ fine"]
        assert {o["device"]["reference"] for o in observations} == {"#" + device["id"]}, "the model performed each finding"
        assert [r["reference"] for r in resource["result"]] == ["#" + o["id"] for o in observations]
        assert {o["status"] for o in observations} == {resource["status"]}
        text = base64.b64decode(resource["presentedForm"][0]["data"]).decode()
        assert "Series 1.2.3.4.2:\nT1 & T2 ^ fine" in text and text.endswith("Impression:\nNormal.")
    assert "resultsInterpreter" not in draft and not contained(draft, "Practitioner")
    (radiologist,) = contained(final, "Practitioner")
    assert radiologist["name"] == [{"text": "Dr Jane Smith", "family": "Smith", "given": ["Jane"], "prefix": ["Dr"]}]
    assert final["resultsInterpreter"] == [{"reference": "#radiologist", "display": "Dr Jane Smith"}]
    assert final["issued"] == "2026-01-02T11:00:00Z" and draft["issued"] == "2026-01-02T10:00:00Z"


def test_destinations_are_fhir_urls():
    fhir = FhirReport()
    assert fhir.accepts("fhir+https://ris.example/fhir") and fhir.accepts("fhir+http://127.0.0.1:8080/fhir/")
    assert not fhir.accepts("https://ris.example/fhir") and not fhir.accepts("stow-rs+http://h/dicom-web") and not fhir.accepts("RIS@h:104")


# -- against the FHIR server -----------------------------------------------------------------------------


@pytest.mark.peers
def test_the_server_refuses_what_is_not_a_valid_diagnostic_report(fhir):
    import httpx

    fhir.start()
    answer = httpx.post(f"{fhir.base}/DiagnosticReport", json={"resourceType": "DiagnosticReport", "status": "bogus"})
    assert answer.status_code == 400 and "not a valid DiagnosticReport" in answer.text and fhir.resources == {}


@pytest.mark.peers
def test_the_draft_creates_the_report_and_the_verified_report_updates_it(db, clock, settings, draft_id, approve, fhir):
    fhir.start()
    first = dispatch(db, clock, draft_id, fhir.destination, kind(settings))
    assert sender(db, clock, kind(settings)).run(first) == "delivered"
    (created,) = fhir.resources.values()
    assert created["status"] == "preliminary" and "resultsInterpreter" not in created

    verified_id = approve(draft_id)
    second = dispatch(db, clock, verified_id, fhir.destination, kind(settings))
    assert sender(db, clock, kind(settings)).run(second) == "delivered"
    (updated,) = fhir.resources.values()
    with db.session() as s:
        study_uid = s.scalar(select(Study.study_uid).join(SRDocument, SRDocument.study_id == Study.id).where(SRDocument.id == draft_id))
        stored = {o.report_id: o for o in s.scalars(select(Output).where(Output.kind == "fhir-diagnostic-report"))}
    assert updated["id"] == created["id"] and updated["meta"]["versionId"] == "2", "the same resource, updated"
    assert [v["status"] for v in fhir.history] == ["preliminary", "final"]
    assert updated["identifier"] == [{"system": SYSTEM, "value": study_uid}]
    assert updated["resultsInterpreter"][0]["display"] == "Jane Smith"
    assert updated["conclusion"] and updated["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{study_uid}"
    assert json.loads(settings.storage.read_bytes(stored[verified_id].path))["status"] == "final"
    assert [m for m, _ in fhir.requests] == ["GET", "POST", "GET", "PUT"]
    assert attempt_items(db, second) == [
        [
            {
                "http_status": 200,
                "id": created["id"],
                "location": f"{fhir.base}/DiagnosticReport/{created['id']}/_history/2",
                "status": "final",
            }
        ]
    ]
    assert history(db, second)[0] == ("delivered", 1, None)
    assert history(db, second)[2] == ["dispatch.queued", "dispatch.delivered"]


@pytest.mark.peers
def test_a_late_draft_never_overwrites_the_final_report(db, clock, settings, draft_id, approve, fhir):
    fhir.start()
    late = dispatch(db, clock, draft_id, fhir.destination, kind(settings))
    verified = dispatch(db, clock, approve(draft_id), fhir.destination, kind(settings))
    assert sender(db, clock, kind(settings)).run(verified) == "delivered"
    assert sender(db, clock, kind(settings)).run(late) == "delivered"
    assert [v["status"] for v in fhir.history] == ["final"] and list(fhir.resources.values())[0]["status"] == "final"
    (item,) = attempt_items(db, late)[0]
    assert item == {"id": "1", "status_there": "final", "not_sent": "preliminary"}


@pytest.mark.peers
def test_a_server_in_trouble_is_retried_then_the_dispatch_fails(db, clock, settings, draft_id, fhir):
    fhir.start()
    fhir.fail_next = [503, 503, 500]
    dispatch_id = dispatch(db, clock, draft_id, fhir.destination, kind(settings))
    assert sender(db, clock, kind(settings)).run(dispatch_id) == "retrying"
    clock.advance(11)
    assert sender(db, clock, kind(settings)).run(dispatch_id) == "retrying"
    clock.advance(11)
    assert sender(db, clock, kind(settings)).run(dispatch_id) == "failed"
    (status, attempts, error), outcomes, events = history(db, dispatch_id)
    assert (status, attempts) == ("failed", 3) and fhir.resources == {}
    assert error == "gave up after 3 attempts: searching DiagnosticReport by identifier: HTTP 500 Internal Server Error: forced answer 500"
    assert [o for o, _ in outcomes] == ["transient"] * 3
    assert events == ["dispatch.queued", "dispatch.retry_scheduled", "dispatch.retry_scheduled", "dispatch.failed"]


@pytest.mark.peers
def test_a_refusal_fails_at_once_and_a_busy_server_is_retried_until_it_takes_the_report(db, clock, settings, draft_id, approve, fhir):
    fhir.start()
    fhir.fail_next = [429]
    dispatch_id = dispatch(db, clock, draft_id, fhir.destination, kind(settings))
    assert sender(db, clock, kind(settings)).run(dispatch_id) == "retrying"
    clock.advance(11)
    assert sender(db, clock, kind(settings)).run(dispatch_id) == "delivered"
    assert [o for o, _ in history(db, dispatch_id)[1]] == ["transient", "delivered"]

    verified = dispatch(db, clock, approve(draft_id), fhir.destination, kind(settings))
    fhir.fail_writes = [422]  # the search answers; the update is refused (422 Unprocessable Entity): not retried
    assert sender(db, clock, kind(settings)).run(verified) == "failed"
    (status, attempts, error), outcomes, _ = history(db, verified)
    assert (status, attempts) == ("failed", 1) and error.startswith("DiagnosticReport not updated: HTTP 422")
    assert outcomes[0][0] == "refused" and list(fhir.resources.values())[0]["status"] == "preliminary"


@pytest.mark.peers
def test_credentials_are_sent_and_a_wrong_token_is_a_refusal(db, clock, settings, draft_id, fhir):
    fhir.token = "s3cret"
    fhir.start()
    dispatch_id = dispatch(db, clock, draft_id, fhir.destination, kind(settings, "Bearer wrong"))
    assert sender(db, clock, kind(settings, "Bearer wrong")).run(dispatch_id) == "failed"
    assert history(db, dispatch_id)[0][2] == (
        "searching DiagnosticReport by identifier: HTTP 401 Unauthorized: missing or wrong bearer token"
    )
    again = dispatch(db, clock, draft_id, fhir.destination + "/", kind(settings, "Bearer s3cret"))
    assert sender(db, clock, kind(settings, "Bearer s3cret")).run(again) == "delivered"
    assert len(fhir.resources) == 1


@pytest.mark.peers
def test_https_with_the_configured_ca_and_client_certificate(db, clock, make_settings, tmp_path, draft_id):
    """The output TLS settings: the server's certificate is verified against output_tls_ca_file, and ours is presented."""
    import ssl

    from tests.pki import issue, make_ca

    ca = make_ca(tmp_path, "ris-ca")
    server_cert = issue(
        tmp_path,
        "ris",
        ca,
        "/CN=127.0.0.1",
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n",
    )
    client_cert = issue(tmp_path, "medcap", ca, "/CN=MEDCAP", "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca[0]))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(*map(str, server_cert))
    server = FhirServer(tls=context)
    server.start()
    try:
        trusted = make_settings(
            output_destinations=server.destination,
            output_tls_ca_file=ca[0],
            output_tls_cert_file=client_cert[0],
            output_tls_key_file=client_cert[1],
            fhir_report_identifier_system=SYSTEM,
        )
        fhir = FhirReport.from_settings(trusted)
        ok = dispatch(db, clock, draft_id, server.destination, fhir)
        assert sender(db, clock, fhir).run(ok) == "delivered" and len(server.resources) == 1

        # without the CA the server is not trusted: a refusal, not retried
        stranger = FhirReport(HttpPeer(timeout=5), identifier_system=SYSTEM, storage=trusted.storage)
        refused = dispatch(db, clock, draft_id, server.destination + "/", stranger)
        assert sender(db, clock, stranger).run(refused) == "failed"
        assert (
            history(db, refused)[0][2].startswith(f"TLS with {server.base} failed")
            and "CERTIFICATE_VERIFY_FAILED" in history(db, refused)[0][2]
        )
    finally:
        server.stop()
