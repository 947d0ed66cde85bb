"""The STOW-RS kind: real draft and verified SRs stored in Orthanc through its DICOMweb plugin (Debian's
orthanc-dicomweb), with HTTP Basic credentials; refusals, an archive that is down, and how each
STOW-RS answer is read."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import pydicom
import pytest

from service.outputs import StowRS
from service.outputs.http_peer import HttpPeer
from service.outputs.stow_rs import judge
from service.schema import SRDocument
from tests.conftest import free_port
from tests.service.outputs.conftest import attempt_items, dispatch, history, sender
from tests.service.outputs.dicomweb_orthanc import BASIC, DicomWebOrthanc
from tests.tiers import requires


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomWebOrthanc]:
    server = DicomWebOrthanc(tmp_path_factory.mktemp("dicomweb"))
    yield server
    server.stop()


@pytest.fixture
def dicomweb(archive: DicomWebOrthanc) -> DicomWebOrthanc:
    requires("peers")
    if archive.process is None:
        archive.start()
    return archive


def kind(settings, authorization: str | None = BASIC) -> StowRS:
    return StowRS(HttpPeer(authorization, timeout=10), storage=settings.storage)


# -- how answers are read -------------------------------------------------------------------------------


def answer(status: int, body: dict[str, Any] | None) -> httpx.Response:
    return httpx.Response(status, json=body) if body is not None else httpx.Response(status)


def sop(uid: str, reason_tag: str | None = None, reason: int | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"00081155": {"vr": "UI", "Value": [uid]}}
    if reason_tag:
        item[reason_tag] = {"vr": "US", "Value": [reason]}
    return item


@pytest.mark.parametrize(
    ("status", "body", "delivered", "retryable", "summary"),
    [
        (200, {"00081199": {"vr": "SQ", "Value": [sop("1.2")]}}, True, False, "stored by STOW-RS (HTTP 200)"),
        (202, {"00081199": {"vr": "SQ", "Value": [sop("1.2", "00081196", 0xB000)]}}, True, False, "stored by STOW-RS (HTTP 202)"),
        (200, None, True, False, "stored by STOW-RS (HTTP 200, no response body)"),
        (
            409,
            {"00081198": {"vr": "SQ", "Value": [sop("1.2", "00081197", 0xC000)]}},
            False,
            False,
            "STOW-RS failed the SR: HTTP 409, failure reason 0xC000",
        ),
        (
            202,
            {"00081198": {"vr": "SQ", "Value": [sop("1.2", "00081197", 0xA700)]}},
            False,
            True,
            "STOW-RS failed the SR: HTTP 202, failure reason 0xA700",
        ),
        (200, {"00081199": {"vr": "SQ", "Value": [sop("9.9")]}}, False, True, "STOW-RS answered HTTP 200 without naming the SR"),
        (503, None, False, True, "STOW-RS: HTTP 503 Service Unavailable"),
        (413, None, False, False, "STOW-RS: HTTP 413 Request Entity Too Large"),
        (415, None, False, False, "STOW-RS: HTTP 415 Unsupported Media Type"),
    ],
)
def test_each_stow_answer_has_its_outcome(status, body, delivered, retryable, summary):
    delivery = judge(answer(status, body), "1.2")
    assert (delivery.delivered, delivery.retryable) == (delivered, retryable)
    assert delivery.summary.startswith(summary)


def test_destinations_are_stow_rs_urls():
    stow = StowRS()
    assert stow.accepts("stow-rs+https://pacs.example/dicom-web") and stow.accepts("stow-rs+http://127.0.0.1:8042/dicom-web/")
    assert not stow.accepts("https://pacs.example/dicom-web") and not stow.accepts("fhir+http://h/fhir") and not stow.accepts("PACS@h:104")


# -- Orthanc's DICOMweb --------------------------------------------------------------------------------


@pytest.mark.peers
def test_draft_and_verified_sr_land_in_orthanc_by_stow_rs(db, clock, settings, draft_id, approve, dicomweb):
    stow = kind(settings)
    first = dispatch(db, clock, draft_id, dicomweb.destination, stow)
    assert sender(db, clock, stow).run(first) == "delivered"
    verified_id = approve(draft_id)
    second = dispatch(db, clock, verified_id, dicomweb.destination, stow)
    assert sender(db, clock, stow).run(second) == "delivered"

    with db.session() as s:
        draft, verified = s.get(SRDocument, draft_id), s.get(SRDocument, verified_id)
    for report, flag in ((draft, "UNVERIFIED"), (verified, "VERIFIED")):
        stored = dicomweb.instance(report.sop_instance_uid)
        assert stored is not None, f"the {flag} SR is not in Orthanc"
        ours = pydicom.dcmread(report.path)
        assert stored.VerificationFlag == flag and stored.StudyInstanceUID == ours.StudyInstanceUID
        assert stored.ContentSequence == ours.ContentSequence, "the report's content arrived whole"
    assert attempt_items(db, second) == [[{"sop_instance_uid": verified.sop_instance_uid, "status": "HTTP 200", "warning": None}]]
    assert history(db, second)[0] == ("delivered", 1, None)
    assert history(db, first)[2] == ["dispatch.queued", "dispatch.delivered"]


@pytest.mark.peers
def test_wrong_credentials_are_a_refusal(db, clock, settings, draft_id, dicomweb):
    bad = kind(settings, "Basic " + base64.b64encode(b"medcap:guess").decode())
    dispatch_id = dispatch(db, clock, draft_id, dicomweb.destination, bad)
    assert sender(db, clock, bad).run(dispatch_id) == "failed"
    (status, attempts, error), outcomes, events = history(db, dispatch_id)
    assert (status, attempts) == ("failed", 1) and error.startswith("STOW-RS: HTTP 401 Unauthorized")
    assert outcomes[0][0] == "refused" and events == ["dispatch.queued", "dispatch.failed"]


@pytest.mark.peers
def test_an_archive_that_is_down_is_retried_then_the_dispatch_fails(db, clock, settings, draft_id, dicomweb):
    down = f"stow-rs+http://127.0.0.1:{free_port()}/dicom-web"
    stow = kind(settings)
    dispatch_id = dispatch(db, clock, draft_id, down, stow)
    assert sender(db, clock, stow).run(dispatch_id) == "retrying"
    clock.advance(11)
    assert sender(db, clock, stow).run(dispatch_id) == "retrying"
    clock.advance(11)
    assert sender(db, clock, stow).run(dispatch_id) == "failed"
    (status, attempts, error), outcomes, events = history(db, dispatch_id)
    assert (status, attempts) == ("failed", 3) and error.startswith("gave up after 3 attempts: http://127.0.0.1:")
    assert "unreachable: ConnectError" in error and [o for o, _ in outcomes] == ["transient"] * 3
    assert events == ["dispatch.queued", "dispatch.retry_scheduled", "dispatch.retry_scheduled", "dispatch.failed"]


@pytest.mark.peers
def test_an_sr_that_is_not_of_the_study_in_the_url_is_refused_by_orthanc(db, clock, settings, draft_id, dicomweb):
    """Orthanc checks the instance against the study of the URL: its answer is read, not assumed."""
    with db.session() as s:
        report = s.get(SRDocument, draft_id)
        data = settings.storage.read_bytes(report.path)
    boundary = "b0undary"
    body = b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n--" + boundary.encode() + b"--\r\n"
    response = httpx.post(
        f"{dicomweb.url}/dicom-web/studies/1.2.3.4.5",
        content=body,
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
            "Authorization": BASIC,
        },
    )
    delivery = judge(response, report.sop_instance_uid)
    assert response.status_code == 409, response.text
    assert (delivery.delivered, delivery.retryable) == (False, False) and delivery.summary.startswith("STOW-RS failed the SR: HTTP 409")
    assert delivery.items[0]["sop_instance_uid"] == report.sop_instance_uid
