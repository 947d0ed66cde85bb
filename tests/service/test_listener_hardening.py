"""Issue 12, the listener's half: each defect as its reproduction, against a real listener on loopback.

Malformed input is built by benchmarks/fuzz_listener.py's generators (the same the fuzz run uses)
and sent from other loopback addresses (127.0.0.2, 127.0.0.3) where the address matters.
"""

from __future__ import annotations

import copy
import resource
import socket
import struct
import time
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from benchmarks import fuzz_listener as fz
from dicom_io.instance import STATUS_BAD_ATTRIBUTE, STATUS_CANNOT_DECODE
from service import ingest as ingest_module
from service.schema import Association, AuditEvent, Instance
from tests.conftest import series_files

CT = "ct-head-ge"


@pytest.fixture(scope="module")
def base() -> pydicom.Dataset:
    return fz.small_ct(series_files(CT)[0].parent)


def echo_from(port: int, address: str = "127.0.0.1", calling: str = "GOOD") -> bool:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDCAP", bind_address=(address, 0))
    if not assoc.is_established:
        return False
    ok = assoc.send_c_echo().Status == 0
    assoc.release()
    return bool(ok)


def connect_from(address: str, port: int) -> socket.socket:
    s = socket.socket()
    s.bind((address, 0))
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    return s


def closed_by_peer(s: socket.socket, within: float) -> bytes | None:
    """What the listener sent before closing the connection, or None if it is still open after ``within``."""
    s.settimeout(within)
    got = b""
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return got
            got += data
    except TimeoutError:
        return None
    except ConnectionResetError:
        return got


def rows(db, model, *where):
    with db.session() as s:
        return list(s.scalars(select(model).where(*where)))


def store_case(port: int, case: fz.Case, calling: str = "FUZZ", address: str = "127.0.0.2") -> int | None:
    ae = fz.fuzz_ae()
    ae.ae_title = calling
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDCAP", bind_address=(address, 0))
    assert assoc.is_established
    try:
        return fz.send_raw_store(assoc, case, 1)
    finally:
        if assoc.is_established:
            assoc.release()


def instance_files(settings) -> list[Path]:
    return [p for p in settings.storage.instances_dir.rglob("*") if p.is_file()]


# -- D1: admission at accept -------------------------------------------------------------


def test_idle_connections_from_a_stranger_do_not_lock_out_an_allowed_peer(db, start_listener, make_settings):
    listener = start_listener(make_settings(allowed_peers="GOOD@127.0.0.1/32", max_associations=5))
    strangers = [connect_from("127.0.0.3", listener.port) for _ in range(30)]
    try:
        assert all(closed_by_peer(s, 2) == b"" for s in strangers), "a stranger's connection is closed at accept"
        assert echo_from(listener.port), "the allowed peer is served"
    finally:
        for s in strangers:
            s.close()
    assert listener.wait_idle(10)
    refused = rows(db, Association, Association.outcome == "rejected")
    assert refused and all(r.peer_address == "127.0.0.3" for r in refused), "only the stranger is audited as refused"
    assert len(refused) == 1, "30 refusals in a minute: one row now, the rest counted when the minute is over"


def test_one_address_holds_a_bounded_number_of_silent_connections_for_a_short_time(db, start_listener, make_settings):
    settings = make_settings(
        allowed_peers="GOOD@127.0.0.1/32,OTHER@127.0.0.2/32", max_connections_per_address=3, request_timeout_seconds=1.0
    )
    listener = start_listener(settings)
    silent = [connect_from("127.0.0.2", listener.port) for _ in range(5)]
    try:
        assert [closed_by_peer(s, 0.5) for s in silent[3:]] == [b"", b""], "past the per-address limit: closed at once"
        assert echo_from(listener.port), "another address is still served"
        started = time.monotonic()
        assert all(closed_by_peer(s, 5) is not None for s in silent[:3]), "silent connections are closed after the request timeout"
        assert time.monotonic() - started < 4
    finally:
        for s in silent:
            s.close()
    assert listener.gate.counts() == (0, 0) or listener.wait_idle(5)


# -- D2: PDU lengths checked before the body is read ---------------------------------------


def test_an_associate_request_announcing_300_mb_is_aborted_unread(db, start_listener, make_settings):
    listener = start_listener(make_settings(allowed_peers="*@127.0.0.0/8"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    s = connect_from("127.0.0.1", listener.port)
    try:
        s.sendall(struct.pack(">BBL", 0x01, 0, 300 * 1024 * 1024) + b"\x00" * 1024)
        answer = closed_by_peer(s, 3)
    finally:
        s.close()
    assert answer is not None and answer[:1] in (b"\x07", b""), "aborted (A-ABORT) and closed, without waiting for 300 MB"
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 50
    assert echo_from(listener.port)


def test_a_pdata_pdu_over_the_negotiated_maximum_aborts_the_association(db, start_listener, make_settings):
    listener = start_listener(make_settings(allowed_peers="FUZZ@127.0.0.2/32", max_pdu_bytes=1024 * 1024))
    s = connect_from("127.0.0.2", listener.port)
    try:
        s.sendall(fz.associate_rq("FUZZ"))
        accept = s.recv(6)
        assert accept[:1] == b"\x02", "associated"
        s.recv(struct.unpack(">L", accept[2:6])[0])
        s.sendall(struct.pack(">BBL", 0x04, 0, 4 * 1024 * 1024) + b"\x00" * 4096)  # 4 MB announced, 1 MB negotiated
        answer = closed_by_peer(s, 3)
    finally:
        s.close()
    assert answer is not None and answer[:1] == b"\x07", "A-ABORT"
    assert listener.wait_idle(10)
    (assoc,) = rows(db, Association)
    assert assoc.outcome == "aborted" and assoc.ended_at is not None


# -- D3, D5, D10, D11: what gets Success ------------------------------------------------------


def _case(base, kind: str) -> fz.Case:
    ds = copy.deepcopy(base)
    ds.SOPInstanceUID = uid = generate_uid()
    if kind == "pixel_length_past_end":
        data = bytearray(fz.encode(ds))
        at = data.rindex(b"\xe0\x7f\x10\x00")
        struct.pack_into("<L", data, at + 8, len(data) - at - 12 + 1000)
        return fz.Case(kind, bytes(data), uid)
    if kind == "implicit_on_explicit":
        return fz.Case(kind, fz.encode(ds, implicit=True), uid)
    if kind in ("Rows", "Columns", "BitsAllocated"):
        setattr(ds, kind, 0)
        return fz.Case(kind, fz.encode(ds), uid)
    if kind == "pixel_data_too_long":
        ds.PixelData = bytes(len(ds.PixelData) + 64)
        return fz.Case(kind, fz.encode(ds), uid)
    if kind == "uid_with_newline":
        return fz.Case(kind, *fz.with_raw_uid(ds, "SOPInstanceUID", b"1.2.3\n"))
    if kind == "blank_affected_uid":
        return fz.Case(kind, fz.encode(ds), "")
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        ("pixel_length_past_end", STATUS_CANNOT_DECODE),
        ("implicit_on_explicit", STATUS_CANNOT_DECODE),
        ("Rows", STATUS_BAD_ATTRIBUTE),
        ("Columns", STATUS_BAD_ATTRIBUTE),
        ("BitsAllocated", STATUS_BAD_ATTRIBUTE),
        ("pixel_data_too_long", STATUS_CANNOT_DECODE),
        ("uid_with_newline", STATUS_BAD_ATTRIBUTE),
        ("blank_affected_uid", STATUS_BAD_ATTRIBUTE),
    ],
)
def test_malformed_datasets_get_a_failure_and_nothing_is_stored(db, start_listener, make_settings, base, kind, status):
    settings = make_settings(allowed_peers="FUZZ@127.0.0.2/32")
    listener = start_listener(settings)
    started = time.monotonic()
    assert store_case(listener.port, _case(base, kind)) == status
    assert time.monotonic() - started < 10, "answered, not left to the sender's timeout"
    assert listener.wait_idle(10)
    assert rows(db, Instance) == [] and instance_files(settings) == []
    (failed,) = rows(db, AuditEvent, AuditEvent.action == "instance.failed")
    assert failed.details["status"] == f"0x{status:04X}"


def test_a_well_formed_instance_still_gets_success_with_its_uid_as_sent(db, start_listener, make_settings, base):
    settings = make_settings(allowed_peers="FUZZ@127.0.0.2/32")
    listener = start_listener(settings)
    ds = copy.deepcopy(base)
    ds.SOPInstanceUID = generate_uid()
    case = fz.Case("good", fz.encode(ds), str(ds.SOPInstanceUID))
    assert store_case(listener.port, case) == 0
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    ds.SOPInstanceUID = generate_uid()
    deflated = fz.Case(
        "deflated", deflater.compress(fz.encode(ds)) + deflater.flush(), str(ds.SOPInstanceUID), DeflatedExplicitVRLittleEndian
    )
    assert store_case(listener.port, deflated) == 0
    assert listener.wait_idle(10)
    assert len(rows(db, Instance)) == 2 and len(instance_files(settings)) == 2


def test_a_deflate_bomb_is_refused_at_the_inflate_limit(db, start_listener, make_settings, base):
    settings = make_settings(allowed_peers="FUZZ@127.0.0.2/32", max_inflated_mb=1)
    listener = start_listener(settings)
    ds = copy.deepcopy(base)
    ds.SOPInstanceUID = generate_uid()
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = deflater.compress(fz.encode(ds)) + deflater.compress(bytes(64 * 1024 * 1024)) + deflater.flush()
    assert len(bomb) < 200_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert store_case(listener.port, fz.Case("bomb", bomb, str(ds.SOPInstanceUID), DeflatedExplicitVRLittleEndian)) == STATUS_CANNOT_DECODE
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 32, "not inflated to 64 MB"
    assert listener.wait_idle(10)
    (failed,) = rows(db, AuditEvent, AuditEvent.action == "instance.failed")
    assert "inflates past the limit" in failed.details["reason"]


# -- D6, D7, D12: every end recorded, no orphans -------------------------------------------


def _outage(*_: object, **__: object) -> None:
    raise OperationalError("UPDATE associations", {}, Exception("database is away"))


def test_an_association_end_that_cannot_be_recorded_is_recorded_when_the_database_is_back(db, start_listener, make_settings, monkeypatch):
    monkeypatch.setattr(ingest_module, "END_RETRY_PAUSES", (0.01,))
    listener = start_listener(make_settings())
    original = listener.ingest._record_end
    monkeypatch.setattr(listener.ingest, "_record_end", _outage)
    assert echo_from(listener.port, calling="ECHO")
    assert listener.wait_idle(10)
    (row,) = rows(db, Association)
    assert row.ended_at is None, "the outage: the end could not be written"
    assert len(listener.deferred) >= 1  # released, and the connection's end: the first seen is kept
    monkeypatch.setattr(listener.ingest, "_record_end", original)
    listener.upkeep()
    (row,) = rows(db, Association)
    assert row.outcome == "released" and row.ended_at is not None
    assert [e.action for e in rows(db, AuditEvent)] == ["association.accepted", "association.ended"]


def test_open_rows_without_a_live_association_are_reconciled(db, start_listener, make_settings, clock):
    listener = start_listener(make_settings())
    stray = listener.ingest.association_accepted("GONE", "MEDCAP", "127.0.0.1", 1234, False)  # its end was never seen
    assert echo_from(listener.port, calling="ECHO")
    assert listener.wait_idle(10)
    assert listener.upkeep() == 1
    with db.session() as s:
        outcome = s.scalar(select(Association.outcome).where(Association.id == stray.id))
        lost = s.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.action == "association.lost"))
    assert outcome == "lost" and lost == 1
    assert listener.upkeep() == 0


def test_refused_instance_files_are_removed_and_audited_after_a_database_outage(db, start_listener, make_settings, base, monkeypatch):
    settings = make_settings(allowed_peers="FUZZ@127.0.0.2/32")
    listener = start_listener(settings)
    ingest = listener.ingest
    saved = {name: getattr(ingest, name) for name in ("_record_instance", "_stored_as")}
    for name in saved:
        monkeypatch.setattr(ingest, name, _outage)
    real_record = ingest_module.audit.record
    down = {"audit": True}

    def record(session, now, actor, action, *args, **kwargs):  # the refusal's audit event cannot be written either
        if down["audit"] and action == ingest_module.Action.INSTANCE_FAILED:
            _outage()
        return real_record(session, now, actor, action, *args, **kwargs)

    monkeypatch.setattr(ingest_module.audit, "record", record)
    ds = copy.deepcopy(base)
    ds.SOPInstanceUID = generate_uid()
    status = store_case(listener.port, fz.Case("good", fz.encode(ds), str(ds.SOPInstanceUID)))
    assert status == 0xA700
    assert len(instance_files(settings)) == 1, "during the outage the file cannot be checked, so it stays"
    for name, method in saved.items():
        monkeypatch.setattr(ingest, name, method)
    down["audit"] = False
    assert listener.wait_idle(10)
    assert len(listener.deferred) == 2, "the file's check and the refusal's audit event wait for the database"
    listener.upkeep()
    assert len(listener.deferred) == 0
    assert instance_files(settings) == [], "no file without a row once the database is back"
    (failed,) = rows(db, AuditEvent, AuditEvent.action == "instance.failed")
    assert failed.details["status"] == "0xA700"


def test_an_association_that_ends_while_its_accept_is_being_recorded_is_closed(db, start_listener, make_settings, monkeypatch):
    listener = start_listener(make_settings())
    accepted = listener.ingest.association_accepted

    def slow_accept(*args: object, **kwargs: object):
        record = accepted(*args, **kwargs)
        time.sleep(0.5)  # the peer aborts meanwhile: its abort finds no record yet
        return record

    monkeypatch.setattr(listener.ingest, "association_accepted", slow_accept)
    ae = AE(ae_title="RACER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="MEDCAP")
    assert assoc.is_established
    assoc.abort()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and rows(db, Association, Association.ended_at.is_(None)):
        time.sleep(0.1)
    (row,) = rows(db, Association)
    assert row.ended_at is not None and row.outcome == "aborted"


# -- D8: refusals aggregated per peer and minute ------------------------------------------------


def test_repeated_refusals_are_one_row_per_peer_and_minute_plus_their_count(db, start_listener, make_settings, clock):
    listener = start_listener(make_settings(allowed_peers="GOOD@127.0.0.1/32"))
    for _ in range(20):
        assert not echo_from(listener.port, calling="INTRUDER")
    assert len(rows(db, Association, Association.outcome == "rejected")) == 1
    clock.advance(60)
    listener.upkeep()
    refused = rows(db, Association, Association.outcome == "rejected")
    assert len(refused) == 2
    events = rows(db, AuditEvent, AuditEvent.action == "association.rejected")
    assert [e.details.get("repeated") for e in events] == [None, 19]
    assert "19 more refusals" in refused[1].reason and "INTRUDER" in refused[1].reason
