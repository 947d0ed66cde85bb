"""Fuzz `medcap listen` with malformed datasets and PDUs while an allowed peer keeps checking it.

Usage::

    .venv/bin/python benchmarks/fuzz_listener.py [--seed 1] [--datasets 1000] [--pdus 1000] [--json FILE]

Starts ``medcap listen`` (SQLite, a temporary data dir) on a free port of 127.0.0.1 and sends,
seeded and bounded:

- **datasets**: C-STOREs of malformed datasets (cut short, lengths past the end, implicit-VR
  bytes on an explicit-VR context, zero or impossible image dimensions, pixel data of the wrong
  length, bad UIDs, a blank Affected SOP Instance UID, deflate bombs, unterminated sequences),
  from ``FUZZ@127.0.0.2`` (an allowed peer);
- **PDUs**: raw TCP from 127.0.0.2 (allowed address) and 127.0.0.3 (not allowed): oversized and
  corrupt A-ASSOCIATE-RQs, unknown PDU types, P-DATA before or beyond the negotiated maximum,
  truncated headers, silence, while a few idle connections are held open throughout;

and, all the while, ``HEALTH@127.0.0.1`` opens an association every ``--health-interval``
seconds with a C-ECHO and a C-STORE of a valid instance. It reports crashes (the listener
exited or logged an unhandled exception), hangs (no answer in time), Success on malformed input,
health checks served, the listener's RSS growth, orphan files and instance rows vs files, and
associations left open. Exit status 3 when a goal is missed (``--no-goals`` to only report).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import copy
import io
import json
import os
import random
import re
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402
from pydicom.filebase import DicomBytesIO  # noqa: E402
from pydicom.filewriter import write_dataset  # noqa: E402
from pydicom.uid import (  # noqa: E402
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE  # noqa: E402
from pynetdicom.dimse_primitives import C_STORE  # noqa: E402
from pynetdicom.pdu import A_ASSOCIATE_RQ  # noqa: E402
from pynetdicom.presentation import build_context  # noqa: E402
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # noqa: E402
from pynetdicom.transport import AddressInformation  # noqa: E402

DEFAULT_SOURCE = Path("/work/shared/data/ct-head-ge")
HEALTH_ADDRESS, FUZZ_ADDRESS, STRANGER_ADDRESS = "127.0.0.1", "127.0.0.2", "127.0.0.3"
MAX_PDU = 65536
MAX_INFLATED_MB = 4
REQUEST_TIMEOUT = 2.0
GOALS = {"crashes": 0, "success_on_malformed": 0, "health_served_pct": 99.0, "rss_growth_mb": 50.0, "orphan_files": 0}


def medcap_command() -> list[str]:
    venv = REPO / ".venv" / "bin" / "medcap"
    return [str(venv)] if venv.is_file() else [sys.executable, "-m", "service.cli"]


# -- inputs --------------------------------------------------------------------------------


def small_ct(source: Path) -> pydicom.Dataset:
    """A real CT header with a 64 x 64 image: every case is small, so quarantine stays small."""
    path = sorted(source.glob("*.dcm"))[0]
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 64
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.SamplesPerPixel = 16, 12, 11, 1
    ds.PixelData = bytes(64 * 64 * 2)
    ds["PixelData"].VR = "OW"
    return ds


def encode(ds: pydicom.Dataset, implicit: bool = False) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, implicit
    write_dataset(buf, ds)
    return buf.getvalue()


def relabelled(base: pydicom.Dataset) -> pydicom.Dataset:
    ds = copy.deepcopy(base)
    ds.SOPInstanceUID = generate_uid()
    return ds


def _pixel_header_offset(data: bytes) -> int:
    return data.rindex(b"\xe0\x7f\x10\x00")


def with_raw_uid(ds: pydicom.Dataset, keyword: str, raw: bytes) -> tuple[bytes, str]:
    """The dataset encoded with ``keyword`` holding exactly ``raw`` (pydicom would tidy it); and the request's UID."""
    placeholder = "9" * len(raw)
    ds[keyword].value = placeholder
    data = encode(ds).replace(placeholder.encode(), raw, 1)
    if keyword != "SOPInstanceUID":
        return data, str(ds.SOPInstanceUID)
    request_uid = raw.decode("latin-1").strip(" \x00\n\x01")
    if len(request_uid) > 64 or not re.fullmatch(r"[0-9]+(\.[0-9]+)*", request_uid):
        request_uid = generate_uid()  # pynetdicom will not send a request naming this one
    return data, request_uid


@dataclass(frozen=True)
class Case:
    kind: str
    data: bytes
    sop_instance_uid: str
    transfer_syntax: str = ExplicitVRLittleEndian


def malformed_dataset(rng: random.Random, base: pydicom.Dataset) -> Case:
    """One dataset that no careful receiver may answer with Success."""
    ds = relabelled(base)
    uid = str(ds.SOPInstanceUID)
    kind = rng.choice(
        [
            "cut_short",
            "pixel_length_past_end",
            "element_length_past_end",
            "implicit_on_explicit",
            "zero_dimension",
            "pixel_length_mismatch",
            "bad_uid",
            "blank_affected_uid",
            "garbage",
            "bad_vr",
            "deflate_bomb",
            "deflate_corrupt",
            "unterminated_sequence",
            "uid_mismatch",
        ]
    )
    if kind == "cut_short":
        data = encode(ds)
        return Case(kind, data[: rng.randrange(16, len(data) - 2)], uid)
    if kind == "pixel_length_past_end":
        buf = bytearray(encode(ds))
        at = _pixel_header_offset(bytes(buf))
        struct.pack_into("<L", buf, at + 8, len(buf) - at - 12 + rng.randrange(1, 1 << 20))
        return Case(kind, bytes(buf), uid)
    if kind == "element_length_past_end":
        buf = bytearray(encode(ds))
        at = buf.index(b"\x10\x00\x10\x00")  # PatientName (0010,0010), a short-length VR
        struct.pack_into("<H", buf, at + 6, 0xFFF0)
        return Case(kind, bytes(buf[: min(len(buf), at + 8 + rng.randrange(0, 0xFFF0))]), uid)
    if kind == "implicit_on_explicit":
        return Case(kind, encode(ds, implicit=True), uid)
    if kind == "zero_dimension":
        setattr(ds, rng.choice(["Rows", "Columns", "BitsAllocated"]), 0)
        return Case(kind, encode(ds), uid)
    if kind == "pixel_length_mismatch":
        ds.Rows = int(ds.Rows) + rng.randrange(1, 64)
        return Case(kind, encode(ds), uid)
    if kind == "bad_uid":
        keyword = rng.choice(["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
        bad = rng.choice(
            [b"1.2.3\n", b"1.2..3", b"1.2.a", b"1." + b"9" * 70, b"01.2.3", b" 1.2.3", b"1.2.3\x01", b"1.2.3.", b"1.2.3\x00\x00"]
        )
        return Case(kind, *with_raw_uid(ds, keyword, bad))
    if kind == "blank_affected_uid":
        return Case(kind, encode(ds), "")
    if kind == "garbage":
        return Case(kind, rng.randbytes(rng.randrange(1, 4096)), uid)
    if kind == "bad_vr":
        buf = bytearray(encode(ds))
        at = buf.index(b"\x10\x00\x20\x00")  # PatientID (0010,0020)
        buf[at + 4 : at + 6] = rng.choice([b"\x00\x00", b"zz", b"12", b"\xff\xfe"])
        return Case(kind, bytes(buf), uid)
    if kind == "deflate_bomb":
        inflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        body = encode(ds)
        bomb = inflater.compress(body) + inflater.compress(b"\x00" * (MAX_INFLATED_MB + 4) * (1 << 20)) + inflater.flush()
        return Case(kind, bomb, uid, DeflatedExplicitVRLittleEndian)
    if kind == "deflate_corrupt":
        return Case(kind, rng.randbytes(rng.randrange(8, 2048)), uid, DeflatedExplicitVRLittleEndian)
    if kind == "unterminated_sequence":
        data = encode(ds)
        at = _pixel_header_offset(data)
        # An undefined-length sequence holding one undefined-length item, never closed.
        seq = struct.pack("<HH2sHL", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF) + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
        tail = struct.pack("<HH2sH", 0x0008, 0x1150, b"UI", 4) + b"1.2\x00"
        return Case(kind, data[:at] + seq + tail, uid)
    # uid_mismatch: the dataset's SOPInstanceUID is not the one the request names
    return Case(kind, encode(ds), generate_uid())


# -- senders -------------------------------------------------------------------------------


def fuzz_ae() -> AE:
    ae = AE(ae_title="FUZZ")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        ae.add_requested_context(CTImageStorage, syntax)
    return ae


def send_raw_store(assoc: Any, case: Case, message_id: int) -> int | None:
    """C-STORE the case's bytes as they are; the status, or None if no answer came."""
    context = next(cx for cx in assoc.accepted_contexts if cx.transfer_syntax[0] == case.transfer_syntax)
    req = C_STORE()
    req.MessageID = message_id
    req.AffectedSOPClassUID = CTImageStorage
    req.AffectedSOPInstanceUID = case.sop_instance_uid or None
    if not case.sop_instance_uid:
        req._AffectedSOPInstanceUID = pydicom.uid.UID("")  # blank, as a broken sender sends it
    req.Priority = 2
    req.DataSet = io.BytesIO(case.data)
    # As pynetdicom's own send_c_store: pause the association's reactor, or it takes the response.
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused and assoc.is_established:
        time.sleep(0.0001)
    try:
        assoc.dimse.send_msg(req, context.context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    if rsp is None:
        return None
    return int(rsp.Status)


@dataclass
class Tally:
    cases: int = 0
    success_on_malformed: int = 0
    no_answer: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    kinds: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)


def run_datasets(port: int, count: int, rng: random.Random, base: pydicom.Dataset) -> Tally:
    tally = Tally()
    ae = fuzz_ae()
    assoc = None
    for i in range(count):
        case = malformed_dataset(rng, base)
        tally.cases += 1
        tally.kinds[case.kind] = tally.kinds.get(case.kind, 0) + 1
        if assoc is None or not assoc.is_established:
            assoc = ae.associate("127.0.0.1", port, ae_title="MEDCAP", bind_address=(FUZZ_ADDRESS, 0))
            if not assoc.is_established:
                tally.no_answer += 1
                assoc = None
                continue
        try:
            status = send_raw_store(assoc, case, i % 65535 + 1)
        except Exception as exc:
            status = None
            tally.examples.append(f"{case.kind}: send failed: {type(exc).__name__}")
        if status is None:
            tally.no_answer += 1
            with contextlib.suppress(Exception):
                assoc.abort()
            assoc = None
            continue
        key = f"0x{status:04X}"
        tally.statuses[key] = tally.statuses.get(key, 0) + 1
        if status == 0:
            tally.success_on_malformed += 1
            if len(tally.examples) < 10:
                tally.examples.append(f"Success on {case.kind}")
        if i % 50 == 49:  # fresh associations now and then, as senders do
            with contextlib.suppress(Exception):
                assoc.release()
            assoc = None
    if assoc is not None and assoc.is_established:
        assoc.release()
    return tally


def associate_rq(calling: str, called: str = "MEDCAP") -> bytes:
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    primitive.calling_presentation_address = AddressInformation(FUZZ_ADDRESS, 0)
    primitive.called_presentation_address = AddressInformation("127.0.0.1", 0)
    cx = build_context(CTImageStorage, [ExplicitVRLittleEndian])
    cx.context_id = 1
    primitive.presentation_context_definition_list = [cx]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    primitive.user_information = [max_length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def pdu_case(rng: random.Random, good_rq: bytes) -> tuple[str, str, list[bytes], float]:
    """(kind, source address, chunks to send, pause between chunks)."""
    source = rng.choice([FUZZ_ADDRESS, FUZZ_ADDRESS, STRANGER_ADDRESS])
    kind = rng.choice(
        [
            "huge_associate_rq",
            "corrupt_associate_rq",
            "unknown_type",
            "pdata_before_association",
            "oversized_pdata",
            "garbage_pdata",
            "short_header",
            "silence",
            "slow_request",
            "random_bytes",
            "bad_called_ae",
        ]
    )
    if kind == "huge_associate_rq":
        return kind, source, [struct.pack(">BBL", 1, 0, rng.randrange(1 << 20, 300 << 20)) + rng.randbytes(64)], 0
    if kind == "corrupt_associate_rq":
        body = bytearray(good_rq)
        for _ in range(rng.randrange(1, 16)):
            body[rng.randrange(6, len(body))] = rng.randrange(256)
        return kind, source, [bytes(body)], 0
    if kind == "unknown_type":
        return kind, source, [struct.pack(">BBL", rng.choice([0, 8, 9, 0x41, 0xFF]), 0, rng.randrange(0, 1 << 31))], 0
    if kind == "pdata_before_association":
        return kind, source, [struct.pack(">BBL", 4, 0, 10) + struct.pack(">LB", 6, 1) + b"\x03\x00\x00\x00\x00"], 0
    if kind == "oversized_pdata":
        return kind, source, [good_rq, struct.pack(">BBL", 4, 0, rng.randrange(MAX_PDU + 1, 300 << 20)) + rng.randbytes(128)], 0.2
    if kind == "garbage_pdata":
        junk = rng.randbytes(rng.randrange(0, 512))
        return kind, source, [good_rq, struct.pack(">BBL", 4, 0, len(junk)) + junk], 0.2
    if kind == "short_header":
        return kind, source, [bytes([1, 0, 0])], 0
    if kind == "silence":
        return kind, source, [], 0
    if kind == "slow_request":
        return kind, source, [good_rq[:6], good_rq[6:20], good_rq[20:30]], 1.0
    if kind == "random_bytes":
        return kind, source, [rng.randbytes(rng.randrange(1, 1024))], 0
    return kind, source, [associate_rq("FUZZ", "NOTMEDCAP")], 0


def run_pdu(port: int, kind: str, source: str, chunks: list[bytes], pause: float, deadline: float) -> str:
    """Send the chunks; return how the listener ended it: 'closed', 'answered' or 'hang'."""
    start = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(5)
        try:
            sock.connect(("127.0.0.1", port))
            for chunk in chunks:
                sock.sendall(chunk)
                if pause:
                    time.sleep(pause)
        except OSError:
            return "closed"
        answered = False
        while time.monotonic() - start < deadline:
            sock.settimeout(max(0.05, deadline - (time.monotonic() - start)))
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            except OSError:
                return "closed"
            if not data:
                return "answered" if answered else "closed"
            answered = True
    # Answered and still open: an association (a corrupt request can still be a valid one) that
    # the listener keeps until its network timeout, as it should. Silent and open is a hang.
    return "answered, open" if answered else "hang"


@dataclass
class Health:
    attempted: int = 0
    served: int = 0
    failures: list[str] = field(default_factory=list)


def health_loop(port: int, base: pydicom.Dataset, stop: threading.Event, interval: float, health: Health) -> None:
    ae = AE(ae_title="HEALTH")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    while True:  # at least once: the warm-up passes a stop that is already set
        health.attempted += 1
        try:
            assoc = ae.associate("127.0.0.1", port, ae_title="MEDCAP", bind_address=(HEALTH_ADDRESS, 0))
            if not assoc.is_established:
                raise RuntimeError("association not established")
            echo = assoc.send_c_echo()
            store = assoc.send_c_store(relabelled(base))
            assoc.release()
            if echo.Status == 0 and store.Status == 0:
                health.served += 1
            else:
                raise RuntimeError(f"echo {echo.get('Status')}, store {store.get('Status')}")
        except Exception as exc:
            if len(health.failures) < 10:
                health.failures.append(f"{type(exc).__name__}: {exc}")
        if stop.wait(interval):
            return


# -- the listener --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_listener(work: Path) -> tuple[subprocess.Popen[bytes], int, str, Path]:
    data = work / "data"
    data.mkdir(parents=True)
    url = f"sqlite:///{(data / 'medcap.sqlite').resolve()}"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDCAP_")}
    env.update(
        MEDCAP_DATA_DIR=str(data),
        MEDCAP_DATABASE_URL=url,
        MEDCAP_DICOM_PORT=str(port),
        MEDCAP_DICOM_BIND_ADDRESS="127.0.0.1",
        MEDCAP_ALLOWED_PEERS=f"HEALTH@{HEALTH_ADDRESS}/32,FUZZ@{FUZZ_ADDRESS}/32",
        MEDCAP_MAX_PDU_BYTES=str(MAX_PDU),
        MEDCAP_MAX_INFLATED_MB=str(MAX_INFLATED_MB),
        MEDCAP_REQUEST_TIMEOUT_SECONDS=str(REQUEST_TIMEOUT),
        MEDCAP_DICOM_TIMEOUT_SECONDS="15",
        MEDCAP_MIN_FREE_DISK_MB="0",
        MEDCAP_QUIET_SECONDS="86400",
        MEDCAP_MAX_WAIT_SECONDS="86400",
        MEDCAP_LOG_LEVEL="WARNING",
    )
    cmd = medcap_command()
    upgrade = subprocess.run([*cmd, "db", "upgrade"], env=env, capture_output=True, text=True, cwd=REPO)
    if upgrade.returncode != 0:
        raise RuntimeError(f"medcap db upgrade failed:\n{upgrade.stdout}{upgrade.stderr}")
    log = work / "listener.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([*cmd, "listen"], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"medcap listen exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            break
        time.sleep(0.2)
    return proc, port, url, data


def database_facts(url: str, data: Path) -> dict[str, int]:
    con = sqlite3.connect(url.removeprefix("sqlite:///"))
    try:
        paths = {row[0] for row in con.execute("SELECT path FROM instances")}
        open_rows = con.execute("SELECT count(*) FROM associations WHERE ended_at IS NULL").fetchone()[0]
        rejected = con.execute("SELECT count(*) FROM associations WHERE outcome = 'rejected'").fetchone()[0]
        audit_rows = con.execute("SELECT count(*) FROM audit_events").fetchone()[0]
    finally:
        con.close()
    files = {str(p) for p in (data / "instances").rglob("*") if p.is_file()}
    return {
        "instance_rows": len(paths),
        "instance_files": len(files),
        "orphan_files": len(files - paths),
        "rows_without_file": len(paths - files),
        "open_association_rows": int(open_rows),
        "rejected_rows": int(rejected),
        "audit_rows": int(audit_rows),
    }


@dataclass
class Report:
    seed: int
    dataset_cases: int
    pdu_cases: int
    crashes: int
    handler_errors: int
    hangs: int
    success_on_malformed: int
    health_attempted: int
    health_served: int
    health_served_pct: float
    rss_start_mb: float
    rss_end_mb: float
    rss_growth_mb: float
    orphan_files: int
    facts: dict[str, int]
    dataset_statuses: dict[str, int]
    dataset_kinds: dict[str, int]
    pdu_outcomes: dict[str, int]
    notes: list[str]
    seconds: float


def fuzz(seed: int, datasets: int, pdus: int, source: Path, health_interval: float, workers: int) -> Report:
    rng = random.Random(seed)
    base = small_ct(source)
    good_rq = associate_rq("FUZZ")
    started = time.monotonic()
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="medcap-fuzz-") as tmp:
        work = Path(tmp)
        proc, port, url, data = start_listener(work)
        health, stop = Health(), threading.Event()
        holders: list[socket.socket] = []
        try:
            # Warm up (imports, first association), then measure from here.
            warm = Health()
            for _ in range(3):
                h_stop = threading.Event()
                h_stop.set()
                health_loop(port, base, h_stop, 0, warm)
            rss_start = rss_mb(proc.pid)
            checker = threading.Thread(target=health_loop, args=(port, base, stop, health_interval, health), daemon=True)
            checker.start()
            # Idle connections held throughout: from a stranger (closed at accept) and an allowed address.
            for address in [STRANGER_ADDRESS] * 30 + [FUZZ_ADDRESS] * 3:
                with contextlib.suppress(OSError):
                    s = socket.socket()
                    s.bind((address, 0))
                    s.connect(("127.0.0.1", port))
                    holders.append(s)

            tally = run_datasets(port, datasets, rng, base)

            outcomes: dict[str, int] = {}
            hangs = tally.no_answer
            cases = [pdu_case(rng, good_rq) for _ in range(pdus)]
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                futures = {
                    pool.submit(run_pdu, port, kind, source_address, chunks, pause, REQUEST_TIMEOUT + 8): kind
                    for kind, source_address, chunks, pause in cases
                }
                for future in concurrent.futures.as_completed(futures):
                    result = future.result()
                    outcomes[f"{futures[future]}:{result}"] = outcomes.get(f"{futures[future]}:{result}", 0) + 1
                    if result == "hang":
                        hangs += 1
            stop.set()
            checker.join(30)
            for s in holders:
                s.close()
            time.sleep(REQUEST_TIMEOUT + 6)  # upkeep (every 5 s) closes whatever is left
            rss_end = rss_mb(proc.pid) if proc.poll() is None else 0.0
            crashed = proc.poll() is not None
        finally:
            stop.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log = (work / "listener.log").read_text(errors="replace")
        # A crash: the process died, or an exception escaped a thread. Errors the listener caught
        # and answered (a handler's 0xC211) are counted apart.
        unhandled = log.count("Exception in thread")
        handler_errors = sum(1 for line in log.splitlines() if " ERROR service." in line)
        for marker in ("Exception in thread", " ERROR service."):
            if marker in log:
                at = log.index(marker)
                notes.append(f"first {marker.strip()!r} in the listener log:\n" + log[at : at + 1500])
        facts = database_facts(url, data)
    notes += tally.examples + [f"health: {f}" for f in health.failures]
    pct = 100.0 * health.served / health.attempted if health.attempted else 0.0
    return Report(
        seed=seed,
        dataset_cases=tally.cases,
        pdu_cases=pdus,
        crashes=int(crashed) + unhandled,
        handler_errors=handler_errors,
        hangs=hangs,
        success_on_malformed=tally.success_on_malformed,
        health_attempted=health.attempted,
        health_served=health.served,
        health_served_pct=round(pct, 2),
        rss_start_mb=round(rss_start, 1),
        rss_end_mb=round(rss_end, 1),
        rss_growth_mb=round(rss_end - rss_start, 1),
        orphan_files=facts["orphan_files"],
        facts=facts,
        dataset_statuses=dict(sorted(tally.statuses.items())),
        dataset_kinds=dict(sorted(tally.kinds.items())),
        pdu_outcomes=dict(sorted(outcomes.items())),
        notes=notes,
        seconds=round(time.monotonic() - started, 1),
    )


def goals_missed(report: Report) -> list[str]:
    missed = []
    if report.crashes > GOALS["crashes"]:
        missed.append(f"crashes {report.crashes}")
    if report.success_on_malformed > GOALS["success_on_malformed"]:
        missed.append(f"Success on malformed {report.success_on_malformed}")
    if report.health_served_pct < GOALS["health_served_pct"]:
        missed.append(f"health checks served {report.health_served_pct}%")
    if report.rss_growth_mb >= GOALS["rss_growth_mb"]:
        missed.append(f"RSS growth {report.rss_growth_mb} MB")
    if report.orphan_files > GOALS["orphan_files"]:
        missed.append(f"orphan files {report.orphan_files}")
    if report.hangs:
        missed.append(f"hangs {report.hangs}")
    if report.facts["rows_without_file"] or report.facts["open_association_rows"]:
        missed.append(
            f"rows without file {report.facts['rows_without_file']}, open association rows {report.facts['open_association_rows']}"
        )
    return missed


def table(report: Report) -> str:
    rows = [
        ("seed", report.seed),
        ("malformed datasets / PDUs", f"{report.dataset_cases} / {report.pdu_cases}"),
        ("crashes (exit or unhandled traceback)", report.crashes),
        ("errors caught by the handlers (logged ERROR)", report.handler_errors),
        ("hangs (no answer or close in time)", report.hangs),
        ("Success on malformed input", report.success_on_malformed),
        ("health checks served (C-ECHO + C-STORE)", f"{report.health_served}/{report.health_attempted} ({report.health_served_pct}%)"),
        ("listener RSS start -> end", f"{report.rss_start_mb} -> {report.rss_end_mb} MB (+{report.rss_growth_mb})"),
        ("orphan files", report.orphan_files),
        ("instance rows / files", f"{report.facts['instance_rows']} / {report.facts['instance_files']}"),
        ("association rows left open", report.facts["open_association_rows"]),
        ("rejected association rows (aggregated)", report.facts["rejected_rows"]),
        ("run time", f"{report.seconds} s"),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--datasets", type=int, default=1000, help="malformed datasets to send (default 1000)")
    parser.add_argument("--pdus", type=int, default=1000, help="malformed PDUs to send (default 1000)")
    parser.add_argument(
        "--source", type=Path, default=DEFAULT_SOURCE, help=f"a CT series to take the header from (default {DEFAULT_SOURCE})"
    )
    parser.add_argument("--health-interval", type=float, default=0.5, help="seconds between health checks (default 0.5)")
    parser.add_argument("--workers", type=int, default=6, help="PDU cases in flight at once (default 6)")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    parser.add_argument("--no-goals", action="store_true", help="report only; exit 0 even when a goal is missed")
    args = parser.parse_args(argv)
    report = fuzz(args.seed, args.datasets, args.pdus, args.source, args.health_interval, args.workers)
    print(table(report))
    print("dataset statuses:", report.dataset_statuses)
    print("PDU outcomes:", report.pdu_outcomes)
    for note in report.notes:
        print("note:", note)
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))
    missed = goals_missed(report)
    print("goals:", "all met" if not missed else "MISSED: " + "; ".join(missed))
    return 3 if missed and not args.no_goals else 0


if __name__ == "__main__":
    sys.exit(main())
