"""STOW-RS in: real DICOM files posted over HTTP to the real app (uvicorn on loopback), real databases."""

from __future__ import annotations

import http.client
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
import uvicorn
from pydicom.filewriter import write_file_meta_info
from sqlalchemy import select

from service import cli, routing
from service.dicomweb_clients import DicomwebClients, token_hash
from service.schema import Association, AuditEvent, DicomwebClient, Instance, Job, StudyVersion
from service.settings import Settings
from service.stow import file_meta_length
from service.web.app import create_app
from tests import samples
from tests.conftest import make_assembler, open_association, send_raw, series_files, wait_until

CT = "ct-head-ge"
MR = "mr-t1-brain-uih"
BOUNDARY = "medcap-test-boundary-7d1c"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
REFERENCED, FAILED = "00081199", "00081198"
SOP_CLASS, SOP_INSTANCE, FAILURE_REASON = "00081150", "00081155", "00081197"


@dataclass
class Server:
    url: str
    settings: Settings
    token: str

    def post(self, body: bytes | Iterator[bytes], path: str = "/dicomweb/studies", **headers: str) -> httpx.Response:
        sent = {"Content-Type": CONTENT_TYPE, "Accept": "application/dicom+json", "Authorization": f"Bearer {self.token}", **headers}
        return httpx.post(self.url + path, content=body, headers={k: v for k, v in sent.items() if v}, timeout=120)


def run_app(settings: Settings, db: Any, clock: Any) -> Iterator[str]:
    config = uvicorn.Config(create_app(settings, db, clock), host="127.0.0.1", port=settings.web_port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, "the web app to start", timeout=30)
    try:
        yield f"http://127.0.0.1:{settings.web_port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture
def make_server(db, clock, make_settings):
    stack: list[Iterator[str]] = []

    def make(**overrides: object) -> Server:
        settings = make_settings(**overrides)
        _, token = DicomwebClients(db, clock).add("PACS1", "127.0.0.1/32", "cli:test")
        running = run_app(settings, db, clock)
        stack.append(running)
        return Server(next(running), settings, token)

    yield make
    for running in stack:
        next(running, None)


@pytest.fixture
def server(make_server) -> Server:
    return make_server()


def multipart(*parts: bytes, part_type: str = "application/dicom") -> bytes:
    out = bytearray()
    for part in parts:
        out += f"--{BOUNDARY}\r\nContent-Type: {part_type}\r\n\r\n".encode() + part + b"\r\n"
    return bytes(out + f"--{BOUNDARY}--\r\n".encode())


def uids(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)


def referenced(body: dict[str, Any]) -> list[tuple[str, str]]:
    return [(item[SOP_CLASS]["Value"][0], item[SOP_INSTANCE]["Value"][0]) for item in body[REFERENCED].get("Value", [])]


def failures(body: dict[str, Any]) -> list[tuple[str | None, int]]:
    return [((item[SOP_INSTANCE].get("Value") or [None])[0], item[FAILURE_REASON]["Value"][0]) for item in body[FAILED].get("Value", [])]


def stored(db) -> dict[str, Instance]:
    with db.session() as s:
        return {i.sop_instance_uid: i for i in s.scalars(select(Instance))}


def events(db, *actions: str) -> list[AuditEvent]:
    with db.session() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.action.in_(actions)).order_by(AuditEvent.id)))


def requests(db) -> list[Association]:
    with db.session() as s:
        return list(s.scalars(select(Association).order_by(Association.id)))


# -- success, and the same guarantees as C-STORE ------------------------------------------


def test_a_series_is_stored_and_committed_before_the_response(db, server):
    files = series_files(CT)[:6]
    response = server.post(multipart(*(p.read_bytes() for p in files)))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom+json"
    body = response.json()
    assert referenced(body) == [uids(p)[:2] for p in files]
    assert FAILED in body and failures(body) == []
    rows = stored(db)
    assert set(rows) == {uids(p)[1] for p in files}
    for path in files:
        row = rows[uids(path)[1]]
        on_disk = Path(row.path).read_bytes()
        assert on_disk.endswith(path.read_bytes()[-4096:]), "the dataset is stored as sent"
        assert pydicom.dcmread(row.path).SOPInstanceUID == uids(path)[1]
    (request,) = requests(db)
    assert (request.calling_ae, request.called_ae, request.outcome, request.instances_received) == ("PACS1", "STOW-RS", "released", 6)
    assert request.ended_at is not None and all(r.association_id == request.id for r in rows.values())
    started, ended = events(db, "stow.started", "stow.ended")
    assert started.actor == ended.actor == "dicomweb:PACS1@127.0.0.1"
    assert ended.details["http_status"] == 200 and ended.details["received"] == 6


def test_resending_the_same_request_is_idempotent(db, server):
    body = multipart(*(p.read_bytes() for p in series_files(CT)[:4]))
    first, second = server.post(body), server.post(body)
    assert first.status_code == second.status_code == 200
    assert referenced(first.json()) == referenced(second.json())
    assert len(stored(db)) == 4
    files = sorted(p for p in (server.settings.data_dir / "instances").rglob("*.dcm"))
    assert len(files) == 4, "no second file"
    assert [(r.instances_received, r.instances_duplicate) for r in requests(db)] == [(4, 0), (0, 4)]
    assert events(db, "instance.replaced") == []


def test_an_instance_sent_over_c_store_and_then_stow_rs_is_a_duplicate(db, server, listener):
    path = series_files(CT)[0]
    assoc = open_association(listener.port)
    assert send_raw(assoc, [path]) == [0]
    assoc.release()
    assert listener.wait_idle(30)
    assert server.post(multipart(path.read_bytes())).status_code == 200
    (row,) = stored(db).values()
    stow_request = requests(db)[-1]
    assert (stow_request.instances_received, stow_request.instances_duplicate) == (0, 1), "same file meta, same hash"
    assert events(db, "instance.replaced") == []


def test_the_study_is_assembled_once_the_request_ends_and_gets_one_job(db, server, clock, publisher):
    """A STOW-RS request is an open sender: quiet time while it is still sending does not complete the study."""
    files = series_files(CT)
    assembler = make_assembler(db, clock, server.settings, publisher)
    release = threading.Event()

    def body() -> Iterator[bytes]:
        for i, path in enumerate(files):
            yield multipart(path.read_bytes())[: -len(f"--{BOUNDARY}--\r\n")]
            if i == 9:
                release.wait(60)  # the sender pauses mid-study
        yield f"--{BOUNDARY}--\r\n".encode()

    result: dict[str, httpx.Response] = {}
    sender = threading.Thread(target=lambda: result.setdefault("r", server.post(body())))
    sender.start()
    # A part is complete once the next boundary has been read: nine of the ten sent are committed.
    wait_until(lambda: len(stored(db)) == 9, "the first nine instances to be committed", timeout=60)
    clock.advance(server.settings.quiet_seconds * 3)
    assert assembler.tick() == [], "quiet, but the STOW-RS request has not ended"
    release.set()
    sender.join(120)
    assert result["r"].status_code == 200 and len(referenced(result["r"].json())) == len(files)
    assert assembler.tick() == [], "the quiet period restarts with the last arrival"
    clock.advance(server.settings.quiet_seconds + 1)
    created = assembler.tick()
    assert len(created) == 1 and publisher.published == created
    with db.session() as s:
        (version,) = s.scalars(select(StudyVersion)).all()
        (job,) = s.scalars(select(Job)).all()
    assert (version.instance_count, version.captionable_count, version.trigger) == (len(files), len(files), "stable")
    assert job.study_version_id == version.id


# -- bad input: a clear answer per instance, nothing lost -----------------------------------


def test_bad_parts_fail_alone_with_their_reasons_and_are_quarantined(db, server, tmp_path):
    good = series_files(CT)[0]
    source = series_files(CT)[1]
    garbage = samples.garbage(source, tmp_path / "garbage.dcm")
    no_pixels = samples.without_pixel_data(series_files(CT)[2], tmp_path / "nopixels.dcm")
    truncated = samples.truncated(series_files(CT)[3], tmp_path / "truncated.dcm")
    response = server.post(multipart(good.read_bytes(), garbage.read_bytes(), no_pixels.read_bytes(), truncated.read_bytes(), b"not dicom"))
    assert response.status_code == 202, response.text
    body = response.json()
    assert referenced(body) == [uids(good)[:2]]
    (garbage_uid, garbage_status), no_pixels_failure, truncated_failure, not_dicom = failures(body)
    # The same statuses as the C-STORE handler answers (tests/service/test_listener.py).
    assert garbage_uid == uids(source)[1] and garbage_status in (0xC210, 0xC220), "UIDs from the file meta"
    assert no_pixels_failure == (uids(no_pixels)[1], 0xA900)
    assert truncated_failure == (uids(truncated)[1], 0xC210)
    assert not_dicom == (None, 0xC210), "not a Part 10 file"
    assert set(stored(db)) == {uids(good)[1]}
    quarantined = list((server.settings.data_dir / "quarantine").rglob("*.dcm"))
    assert len(quarantined) == 4
    failed_events = events(db, "instance.failed")
    assert "truncated" in failed_events[2].details["reason"]
    assert len(failed_events) == 4 and {e.actor for e in failed_events} == {"dicomweb:PACS1@127.0.0.1"}
    (request,) = requests(db)
    assert (request.instances_received, request.instances_failed) == (1, 4)


def test_nothing_stored_answers_409(db, server, tmp_path):
    source = series_files(CT)[0]
    garbage = samples.garbage(source, tmp_path / "garbage.dcm")
    response = server.post(multipart(garbage.read_bytes(), b"not dicom"))
    assert response.status_code == 409
    assert referenced(response.json()) == []
    (garbage_uid, garbage_status), not_dicom = failures(response.json())
    assert garbage_uid == uids(source)[1] and garbage_status in (0xC210, 0xC220) and not_dicom == (None, 0xC210)
    assert stored(db) == {}


def test_an_instance_of_another_study_than_the_url_names_fails(db, server):
    ct, mr = series_files(CT)[0], series_files(MR)[0]
    response = server.post(multipart(ct.read_bytes(), mr.read_bytes()), path=f"/dicomweb/studies/{uids(ct)[2]}")
    assert response.status_code == 202
    assert referenced(response.json()) == [uids(ct)[:2]]
    assert failures(response.json()) == [(uids(mr)[1], 0xA900)]
    assert server.post(multipart(ct.read_bytes()), path="/dicomweb/studies/not-a-uid").status_code == 400
    long_path = "/dicomweb/studies/" + "1." * 300 + "1"
    assert server.post(multipart(ct.read_bytes()), path=long_path).status_code == 400, "refused and audited, however long"
    assert events(db, "stow.refused")[-1].object_id == f"POST {long_path}"[:128]


def test_unsupported_transfer_syntax_and_sop_class_fail_with_their_reasons(db, server, tmp_path):
    source = series_files(CT)[0]
    raw = source.read_bytes()
    meta = pydicom.dcmread(source, stop_before_pixels=True).file_meta
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: not one of ours
    buf = io.BytesIO()
    write_file_meta_info(buf, meta)
    mpeg = tmp_path / "mpeg.dcm"
    mpeg.write_bytes(raw[:128] + b"DICM" + buf.getvalue() + raw[file_meta_length(raw) :])
    rt = pydicom.dcmread(series_files(CT)[1])
    rt.SOPClassUID = rt.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.1"  # RT Image: not accepted
    rt_path = tmp_path / "rt.dcm"
    rt.save_as(rt_path)
    response = server.post(multipart(mpeg.read_bytes(), rt_path.read_bytes()))
    assert response.status_code == 409
    assert failures(response.json()) == [(uids(mpeg)[1], 0xC122), (uids(rt_path)[1], 0x0122)]


def test_a_malformed_multipart_body_is_a_bad_request(db, server):
    first, second = series_files(CT)[:2]
    truncated = multipart(first.read_bytes(), second.read_bytes())[:-1000]  # the second part is cut short
    response = server.post(truncated)
    assert response.status_code == 400 and "closing boundary" in response.json()["error"]
    assert response.json()["stored"] == [uids(first)[1]] and set(stored(db)) == {uids(first)[1]}, "what was committed is said, and kept"
    assert server.post(b"\r\n--other-boundary\r\n\r\nxx").status_code == 400
    assert server.post(multipart()).status_code == 400
    (ended, *_) = events(db, "stow.ended")
    assert ended.details["http_status"] == 400


@pytest.mark.parametrize(
    "content_type",
    [
        "application/dicom",
        "application/json",
        f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}',
        f"multipart/form-data; boundary={BOUNDARY}",
        "",
    ],
)
def test_a_wrong_content_type_is_refused_with_415(db, server, content_type):
    response = server.post(multipart(series_files(CT)[0].read_bytes()), **{"Content-Type": content_type})
    assert response.status_code == 415, response.text
    assert "multipart/related" in response.json()["error"]
    assert stored(db) == {} and requests(db) == []
    (refused,) = events(db, "stow.refused")
    assert refused.details["http_status"] == 415 and refused.actor == "dicomweb:PACS1@127.0.0.1"


def test_a_part_of_another_media_type_fails(db, server):
    response = server.post(multipart(series_files(CT)[0].read_bytes(), part_type="application/octet-stream"))
    assert response.status_code == 409 and failures(response.json()) == [(None, 0xC210)]


def test_an_unacceptable_response_type_is_refused_with_406(db, server):
    response = server.post(multipart(series_files(CT)[0].read_bytes()), Accept="application/dicom+xml")
    assert response.status_code == 406 and stored(db) == {}


# -- who may send ------------------------------------------------------------------------


def test_no_unknown_or_revoked_token_gets_in(db, server, clock):
    body = multipart(series_files(CT)[0].read_bytes())
    missing = server.post(body, Authorization="")
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    assert server.post(body, Authorization="Bearer not-a-token").status_code == 401
    assert server.post(body, Authorization=f"Basic {server.token}").status_code == 401
    DicomwebClients(db, clock).remove("PACS1", "cli:test")
    assert server.post(body).status_code == 401, "a removed client's token no longer works"
    assert stored(db) == {} and requests(db) == []
    refusals = events(db, "stow.refused")
    assert [e.details["http_status"] for e in refusals] == [401] * 4
    assert [e.details["reason"] for e in refusals][:2] == ["no bearer token (send Authorization: Bearer TOKEN)", "unknown bearer token"]
    assert all(e.actor == "dicomweb:?@127.0.0.1" for e in refusals)


def test_a_client_outside_its_networks_is_refused_with_403(db, server, clock):
    _, token = DicomwebClients(db, clock).add("REMOTE", "10.1.0.0/16", "cli:test")
    response = server.post(multipart(series_files(CT)[0].read_bytes()), Authorization=f"Bearer {token}")
    assert response.status_code == 403 and stored(db) == {}
    (refused,) = events(db, "stow.refused")
    assert refused.actor == "dicomweb:REMOTE@127.0.0.1" and "may not connect from 127.0.0.1" in refused.details["reason"]


def test_tokens_are_stored_hashed(db, server):
    with db.session() as s:
        (row,) = s.scalars(select(DicomwebClient)).all()
    assert row.token_sha256 == token_hash(server.token) and server.token not in row.token_sha256


def test_clients_are_managed_from_the_command_line(db, settings, monkeypatch, capsys):
    monkeypatch.setenv("MEDCAP_DATABASE_URL", settings.effective_database_url)
    monkeypatch.setenv("MEDCAP_DATA_DIR", str(settings.data_dir))
    assert cli.main(["dicomweb-client", "add", "ORTHANC", "--from", "127.0.0.1,10.0.0.0/8"]) == 0
    token = capsys.readouterr().out.strip()
    assert len(token) >= 40
    assert cli.main(["dicomweb-client", "list"]) == 0
    listed = capsys.readouterr().out
    assert "ORTHANC" in listed and "127.0.0.1/32,10.0.0.0/8" in listed and token not in listed
    assert cli.main(["dicomweb-client", "add", "ORTHANC", "--from", "127.0.0.1"]) == 1
    assert "exists already" in capsys.readouterr().err
    assert cli.main(["dicomweb-client", "add", "bad name", "--from", "127.0.0.1"]) == 1
    assert cli.main(["dicomweb-client", "add", "X", "--from", "not-a-network"]) == 1
    assert cli.main(["dicomweb-client", "remove", "ORTHANC"]) == 0
    assert cli.main(["dicomweb-client", "remove", "ORTHANC"]) == 1
    assert [e.action for e in events(db, "dicomweb.client_added", "dicomweb.client_removed")] == [
        "dicomweb.client_added",
        "dicomweb.client_removed",
    ]


# -- size --------------------------------------------------------------------------------


def test_a_declared_oversize_request_is_refused_before_its_body_is_read(db, make_server):
    server = make_server(dicomweb_max_request_mb=1)
    port = int(server.url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    # Headers only: the 5 GB the header promises are never sent, and the answer still comes.
    conn.putrequest("POST", "/dicomweb/studies")
    for name, value in (("Content-Type", CONTENT_TYPE), ("Authorization", f"Bearer {server.token}"), ("Content-Length", str(5 << 30))):
        conn.putheader(name, value)
    conn.endheaders()
    answer = conn.getresponse()
    assert answer.status == 413
    assert "over the limit of 1048576 bytes" in json.loads(answer.read())["error"]
    conn.close()
    assert requests(db) == [] and events(db, "stow.refused")[0].details["http_status"] == 413


def test_a_streamed_request_is_cut_off_at_the_limit(db, make_server):
    server = make_server(dicomweb_max_request_mb=1)
    files = series_files(CT)  # ~0.5 MB each: the third crosses 1 MiB
    sent: list[int] = []

    def body() -> Iterator[bytes]:
        for path in files:
            chunk = multipart(path.read_bytes())[: -len(f"--{BOUNDARY}--\r\n")]
            sent.append(len(chunk))
            yield chunk
        yield f"--{BOUNDARY}--\r\n".encode()

    try:
        response = server.post(body())
    except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
        pytest.fail("the server should answer 413 before it closes the connection")
    assert response.status_code == 413 and "larger than the limit" in response.json()["error"]
    assert len(sent) < len(files), "the client was stopped before it sent everything"
    kept = response.json()["stored"]
    assert set(stored(db)) == set(kept) and 1 <= len(kept) < len(files), "what arrived before the limit is stored and reported"
    (request,) = requests(db)
    assert request.outcome == "aborted" and request.ended_at is not None


# -- restarts --------------------------------------------------------------------------------


def test_a_request_left_open_by_a_stopped_web_process_is_marked_lost(db, make_settings, clock):
    settings = make_settings()
    app = create_app(settings, db, clock)
    client = DicomwebClients(db, clock).add("PACS1", "127.0.0.1/32", "cli:test")[0]
    left_open = app.state.stow.open(client, "127.0.0.1", 4000, False, "POST /dicomweb/studies", None)
    running = run_app(settings, db, clock)  # a new process of the same web app, same host and port
    next(running)
    try:
        with db.session() as s:
            row = s.get(Association, left_open.id)
        assert row is not None and row.outcome == "lost" and row.ended_at is not None
    finally:
        next(running, None)


def test_the_openapi_schema_lists_the_stow_routes(server):
    paths = httpx.get(server.url + "/api/openapi.json").json()["paths"]
    assert {"/dicomweb/studies", "/dicomweb/studies/{study_uid}"} <= set(paths)


# -- a real client from PyPI -------------------------------------------------------------------


def test_dicomweb_client_stores_a_series_and_reads_the_failures(db, server):
    from dicomweb_client.api import DICOMwebClient
    from requests.exceptions import HTTPError

    files = series_files(MR)
    client = DICOMwebClient(url=f"{server.url}/dicomweb", headers={"Authorization": f"Bearer {server.token}"})
    datasets = [pydicom.dcmread(p) for p in files]
    answer = client.store_instances(datasets, study_instance_uid=str(datasets[0].StudyInstanceUID))
    assert [str(item.ReferencedSOPInstanceUID) for item in answer.ReferencedSOPSequence] == [uids(p)[1] for p in files]
    assert len(answer.FailedSOPSequence) == 0 and len(stored(db)) == len(files)
    broken = pydicom.dcmread(files[0])
    del broken.PixelData
    broken.SOPInstanceUID = broken.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    with pytest.raises(HTTPError) as refused:
        client.store_instances([broken])
    assert refused.value.response.status_code == 409
    assert refused.value.response.json()[FAILED]["Value"][0][FAILURE_REASON]["Value"] == [0xA900]
    unauthenticated = DICOMwebClient(url=f"{server.url}/dicomweb")
    with pytest.raises(HTTPError) as unknown:
        unauthenticated.store_instances(datasets[:1])
    assert unknown.value.response.status_code == 401


def test_a_client_that_goes_away_mid_request_ends_its_request_and_keeps_what_arrived(db, server):
    files = series_files(CT)[:2]
    port = int(server.url.rsplit(":", 1)[1])
    first_part = multipart(files[0].read_bytes())[: -len(f"--{BOUNDARY}--\r\n")]
    # The second part's boundary completes the first part; then the connection drops mid-part.
    sent = first_part + f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + files[1].read_bytes()[:5000]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        head = (
            "POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            f"Content-Type: {CONTENT_TYPE}\r\nAuthorization: Bearer {server.token}\r\n\r\n"
        )
        sock.sendall(head.encode() + f"{len(sent):x}\r\n".encode() + sent + b"\r\n")
        wait_until(lambda: len(stored(db)) == 1, "the first instance to be committed", timeout=30)
    wait_until(lambda: requests(db)[0].ended_at is not None, "the request to be recorded as ended", timeout=30)
    (request,) = requests(db)
    assert request.outcome == "aborted" and request.instances_received == 1
    (ended,) = events(db, "stow.ended")
    assert ended.details["reason"] == "the client went away before the end of the request"
    assert set(stored(db)) == {uids(files[0])[1]}


def test_a_client_that_stalls_is_timed_out_and_releases_its_studies(db, make_server):
    server = make_server(dicom_timeout_seconds=1)
    port = int(server.url.rsplit(":", 1)[1])
    first = series_files(CT)[0]
    sent = multipart(first.read_bytes())[: -len(f"--{BOUNDARY}--\r\n")] + f"--{BOUNDARY}\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        head = (
            "POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            f"Content-Type: {CONTENT_TYPE}\r\nAuthorization: Bearer {server.token}\r\n\r\n"
        )
        sock.sendall(head.encode() + f"{len(sent):x}\r\n".encode() + sent + b"\r\n")
        started = time.monotonic()
        answer = sock.makefile("rb").readline()  # then nothing more is sent
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert time.monotonic() - started < 10
    (request,) = requests(db)
    assert request.outcome == "aborted" and request.ended_at is not None and request.instances_received == 1
    assert "no data for 1 s" in events(db, "stow.ended")[0].details["reason"]


def test_routing_rules_see_a_stow_client_as_the_calling_ae_title(db, server):
    files = series_files(CT)[:3]
    assert server.post(multipart(*(p.read_bytes() for p in files))).status_code == 200
    rules = routing.parse(
        '[[rules]]\nname = "from-pacs1"\ncalling_ae = ["PACS1"]\n\n[[rules]]\nname = "others"\naction = "skip"\n', source="test.toml"
    )
    with db.session() as s:
        explanation = routing.explain_study(s, server.settings.storage, rules, uids(files[0])[2])
    assert explanation is not None
    (series,) = explanation.series
    assert series.facts.calling_ae_titles == {"PACS1"}
    assert (series.decision.rule, series.decision.action.value) == ("from-pacs1", "caption")
