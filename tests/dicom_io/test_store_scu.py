"""Sending SRs to a PACS over real loopback sockets: Orthanc, and pynetdicom SCPs that misbehave on purpose.

Every peer runs on 127.0.0.1 on a free port and is shut down in teardown. The pynetdicom SCPs
answer each C-STORE with a status chosen by the test, reject associations, or never answer.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    BasicTextSRStorage,
    ComprehensiveSRStorage,
    CTImageStorage,
    Verification,
)

from dicom_io.store_scu import (
    Category,
    ClientTLS,
    Destination,
    DispatchResult,
    ErrorKind,
    parse_destinations,
    send,
    status_category,
    status_is_transient,
)
from tests.conftest import Orthanc, free_port, wait_until
from tests.pki import issue, make_ca

SR_FILE = Path(get_testdata_file("test-SR.dcm"))  # Comprehensive SR, Explicit VR Little Endian


def sr(sop_class: str = ComprehensiveSRStorage) -> Dataset:
    """The pydicom test SR under a fresh SOP Instance UID (and, if asked, another SR SOP class)."""
    ds = pydicom.dcmread(SR_FILE)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    return ds


def sr_file(folder: Path) -> Path:
    path = folder / f"{generate_uid()}.dcm"
    sr().save_as(path, enforce_file_format=True)
    return path


def uids(datasets: list[Dataset]) -> list[str]:
    return [str(ds.SOPInstanceUID) for ds in datasets]


# -- a pynetdicom Storage SCP whose answers the test chooses --------------------------------------


class StoreSCP:
    """Answers the n-th C-STORE with ``statuses[n]`` (Success beyond the list), or never, if ``hang``."""

    def __init__(
        self,
        *,
        ae_title: str = "PACS",
        statuses: list[int] | None = None,
        require_calling: list[str] | None = None,
        sop_classes: tuple[str, ...] = (ComprehensiveSRStorage, BasicTextSRStorage),
        hang: bool = False,
        abort_on_store: bool = False,
        max_associations: int = 10,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.statuses = list(statuses or [])
        self.received: list[str] = []
        self.proposed: list[tuple[str, str]] = []  # (SOP class, first transfer syntax) of each requested context
        self.connections = 0
        self.hang = hang
        self.abort_on_store = abort_on_store
        self.unblock = threading.Event()
        self.ae = AE(ae_title=ae_title)
        self.ae.require_called_aet = True
        self.ae.require_calling_aet = require_calling or []
        self.ae.maximum_associations = max_associations
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 30
        for sop_class in sop_classes:
            self.ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.ae.add_supported_context(Verification)
        handlers = [(evt.EVT_CONN_OPEN, self._on_open), (evt.EVT_REQUESTED, self._on_requested), (evt.EVT_C_STORE, self._on_store)]
        self.port = free_port()
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers, ssl_context=ssl_context)

    def destination(self, ae_title: str | None = None, tls: ClientTLS | None = None) -> Destination:
        return Destination(ae_title or self.ae.ae_title, "127.0.0.1", self.port, tls)

    def _on_open(self, event: evt.Event) -> None:
        self.connections += 1

    def _on_requested(self, event: evt.Event) -> None:
        self.proposed += [(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in event.assoc.requestor.requested_contexts]

    def _on_store(self, event: evt.Event) -> Dataset:
        if self.hang:
            self.unblock.wait(30)  # released in teardown, so the server can stop promptly
        if self.abort_on_store:
            event.assoc.abort()
            return Dataset()
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        rsp = Dataset()
        rsp.Status = self.statuses[len(self.received) - 1] if len(self.received) <= len(self.statuses) else 0x0000
        if rsp.Status:
            rsp.ErrorComment = f"test answer {rsp.Status:04X}"
        return rsp

    def stop(self) -> None:
        self.unblock.set()
        self.ae.shutdown()


@pytest.fixture
def start_scp() -> Iterator[Callable[..., StoreSCP]]:
    started: list[StoreSCP] = []

    def start(**kwargs: Any) -> StoreSCP:
        scp = StoreSCP(**kwargs)
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()


def by_uid(result: DispatchResult) -> dict[str, tuple[int | None, Category]]:
    return {o.sop_instance_uid: (o.status, o.category) for o in result.outcomes}


# -- destinations ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ORTHANC@127.0.0.1:4242", ("ORTHANC", "127.0.0.1", 4242)),
        (" PACS_1 @pacs.hospital.example:104 ", ("PACS_1", "pacs.hospital.example", 104)),
        ("A@localhost:65535", ("A", "localhost", 65535)),
        ("SIXTEEN_CHARS_AE@[::1]:1", ("SIXTEEN_CHARS_AE", "::1", 1)),
        ("AE WITH SPACE@10.0.0.1:11112", ("AE WITH SPACE", "10.0.0.1", 11112)),
    ],
)
def test_destination_parses(text, expected):
    d = Destination.parse(text)
    assert (d.ae_title, d.host, d.port) == expected and d.tls is None
    assert Destination.parse(str(d)) == d


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("SEVENTEEN_CHARS_X@h:104", "Destination.ae_title must be 1-16"),
        ("@h:104", "Destination.ae_title must be 1-16"),
        ("   @h:104", "Destination.ae_title must be 1-16"),
        ("BACK\\SLASH@h:104", "Destination.ae_title must be 1-16"),
        ("AE@h:0", "Destination.port must be an integer in 1-65535, got 0"),
        ("AE@h:65536", "Destination.port must be an integer in 1-65535, got 65536"),
        ("AE@h:104x", "Destination.port must be an integer in 1-65535, got '104x'"),
        ("AE@h:", "Destination.port must be an integer in 1-65535"),
        ("AE@:104", "Destination.host must be an IP address or a host name"),
        ("AE@bad_host!:104", "Destination.host must be an IP address or a host name"),
        ("AE@::1:104", "write an IPv6 host in brackets"),
        ("AE-h-104", "must look like AE_TITLE@host:port"),
        ("AE@h", "must look like AE_TITLE@host:port"),
    ],
)
def test_destination_errors_name_the_field(text, message):
    with pytest.raises(ValueError, match=message.replace("\\", "\\\\").replace("(", r"\(").replace(")", r"\)")):
        Destination.parse(text)


def test_destination_constructor_validates_too():
    with pytest.raises(ValueError, match="Destination.port"):
        Destination("PACS", "127.0.0.1", True)
    with pytest.raises(TypeError, match="Destination.tls"):
        Destination("PACS", "127.0.0.1", 104, tls="yes")


def test_parse_destinations():
    assert parse_destinations("") == parse_destinations("  ") == ()
    a, b = parse_destinations("ORTHANC@127.0.0.1:4242, ARCHIVE@pacs.example:104")
    assert (str(a), str(b)) == ("ORTHANC@127.0.0.1:4242", "ARCHIVE@pacs.example:104")
    with pytest.raises(ValueError, match=r"destination 2 of 3: Destination.port must be an integer in 1-65535, got 0"):
        parse_destinations("A@h:1,B@h:0,C@h:3")
    with pytest.raises(ValueError, match=r"destination 2 of 2: 'A@h:1' is listed twice"):
        parse_destinations("A@h:1,A@h:1")
    with pytest.raises(ValueError, match=r"destination 2 of 2: destination '' must look like"):
        parse_destinations("A@h:1,")


# -- statuses -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "category", "transient"),
    [
        (0x0000, Category.SUCCESS, False),
        (0x0001, Category.WARNING, False),
        (0xB000, Category.WARNING, False),
        (0xB006, Category.WARNING, False),
        (0xB007, Category.WARNING, False),
        (0xBFFF, Category.WARNING, False),
        (0xA700, Category.FAILURE, True),
        (0xA7FF, Category.FAILURE, True),
        (0x0213, Category.FAILURE, True),
        (0xA900, Category.FAILURE, False),
        (0xC000, Category.FAILURE, False),
        (0xCFFF, Category.FAILURE, False),
        (0x0110, Category.FAILURE, False),
        (0x0122, Category.FAILURE, False),
        (0xFF00, Category.FAILURE, False),  # Pending is not a C-STORE answer
    ],
)
def test_status_categories(status, category, transient):
    assert status_category(status) is category
    assert (category is Category.FAILURE and status_is_transient(status)) == transient


# -- programming errors raise, before any network traffic ------------------------------------------


def test_programming_errors_raise_before_connecting(start_scp, tmp_path):
    scp = start_scp()
    dest = scp.destination()
    no_meta = sr()
    del no_meta.file_meta.TransferSyntaxUID
    no_uid = sr()
    del no_uid.SOPInstanceUID
    not_dicom = tmp_path / "notes.txt"
    not_dicom.write_text("not DICOM")
    same = sr()
    cases: list[tuple[Callable[[], object], type[Exception], str]] = [
        (lambda: send(dest, []), ValueError, "datasets must not be empty"),
        (lambda: send(dest, [no_meta]), ValueError, r"datasets\[0\] has no TransferSyntaxUID in its file meta"),
        (lambda: send(dest, [sr(), no_uid]), ValueError, r"datasets\[1\] has no SOPInstanceUID"),
        (lambda: send(dest, [not_dicom]), ValueError, r"datasets\[0\] .*notes.txt.* cannot be read as DICOM"),
        (lambda: send(dest, [tmp_path / "missing.dcm"]), ValueError, r"datasets\[0\] .*missing.dcm.* cannot be read"),
        (lambda: send(dest, [same, same]), ValueError, "more than once"),
        (lambda: send(dest, ["x"]), ValueError, "cannot be read as DICOM"),
        (lambda: send(dest, [42]), TypeError, r"datasets\[0\] must be a pydicom Dataset or a Path"),  # type: ignore[list-item]
        (lambda: send(dest, [sr()], calling_ae="A" * 17), ValueError, "calling_ae must be 1-16"),
        (lambda: send(dest, [sr()], timeout=0), ValueError, "timeout must be a number of seconds > 0"),
        (lambda: send("PACS@127.0.0.1:104", [sr()]), TypeError, "destination must be a Destination"),  # type: ignore[arg-type]
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    assert scp.connections == 0


# -- Orthanc as the PACS ----------------------------------------------------------------------------


def log_level_dicom(orthanc: Orthanc, level: str | None = None) -> str:
    """Get or set Orthanc's log level for its DICOM category (plain text, not JSON)."""
    body = level.encode() if level is not None else None
    req = urllib.request.Request(orthanc.url + "/tools/log-level-dicom", data=body, method="PUT" if body else "GET")
    with urllib.request.urlopen(req, timeout=10) as response:
        return str(response.read().decode()).strip()


@pytest.fixture
def pacs(orthanc: Orthanc) -> Iterator[Orthanc]:
    """The session's Orthanc, logging its DICOM associations for the duration of a test."""
    previous = log_level_dicom(orthanc)
    log_level_dicom(orthanc, "verbose")
    yield orthanc
    log_level_dicom(orthanc, previous)


def orthanc_associations(orthanc: Orthanc, calling_ae: str) -> list[str]:
    lines = orthanc.log.read_text(errors="replace").splitlines()
    return [line for line in lines if f"Association Received from AET {calling_ae} " in line]


def lookup(orthanc: Orthanc, uid: str) -> list[dict[str, str]]:
    found: list[dict[str, str]] = orthanc.request("POST", "/tools/lookup", uid.encode())
    return found


@pytest.mark.orthanc
def test_sends_srs_to_orthanc_over_one_association(pacs, tmp_path):
    datasets = [sr(), sr(), sr()]
    path = sr_file(tmp_path)
    dest = Destination("ORTHANC", "127.0.0.1", pacs.dicom_port)
    result = send(dest, [*datasets, path], calling_ae="MEDCAPONE", timeout=10)

    assert result.delivered and not result.retryable and result.error is None, result.summary
    sent = [*uids(datasets), str(pydicom.dcmread(path).SOPInstanceUID)]
    assert [o.sop_instance_uid for o in result.outcomes] == sent
    assert {(o.status, o.category, o.error) for o in result.outcomes} == {(0x0000, Category.SUCCESS, None)}
    for uid in sent:
        (hit,) = lookup(pacs, uid)
        assert hit["Type"] == "Instance"
        tags = pacs.request("GET", f"/instances/{hit['ID']}/simplified-tags")
        assert (tags["SOPInstanceUID"], tags["Modality"]) == (uid, "SR")
    # Orthanc logged exactly one association from our calling AE title for all four instances.
    wait_until(lambda: orthanc_associations(pacs, "MEDCAPONE"), "Orthanc to log the association")
    time.sleep(0.2)  # a second association, had there been one, would be logged by now
    assert len(orthanc_associations(pacs, "MEDCAPONE")) == 1


@pytest.mark.orthanc
def test_orthanc_answers_success_to_a_duplicate_and_keeps_the_first_copy(pacs):
    first = sr()
    dest = Destination("ORTHANC", "127.0.0.1", pacs.dicom_port)
    assert send(dest, [first], timeout=10).delivered
    (hit,) = lookup(pacs, str(first.SOPInstanceUID))
    changed = pydicom.dcmread(SR_FILE)
    changed.SOPInstanceUID = changed.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    changed.ContentDate = "20991231"

    again = send(dest, [changed], timeout=10)

    # Plain Success, not a warning: a re-send after a lost response is harmless, but a revised SR
    # under the same SOP Instance UID would be dropped without a word (Orthanc's OverwriteInstances
    # is false by default). Revisions must get a new SOP Instance UID.
    assert again.delivered and again.outcomes[0].status == 0x0000
    assert pacs.request("GET", f"/instances/{hit['ID']}/simplified-tags")["ContentDate"] == first.ContentDate


@pytest.mark.orthanc
def test_orthanc_with_the_wrong_called_ae_title_still_stores(pacs):
    # Orthanc's DicomCheckCalledAet is false by default: a typo in the AE title goes unnoticed there.
    ds = sr()
    result = send(Destination("NOT-ORTHANC", "127.0.0.1", pacs.dicom_port), [ds], timeout=10)
    assert result.delivered and lookup(pacs, str(ds.SOPInstanceUID))


# -- every response checked -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("statuses", "delivered", "retryable"),
    [
        ([0x0000, 0xB000, 0xA700, 0xC000], False, False),  # one permanent failure decides
        ([0x0000, 0xB000, 0xB007, 0x0001], True, False),  # warnings are delivered
        ([0x0000, 0xA700, 0xA7FF, 0x0000], False, True),  # out of resources only: try again later
        ([0x0000, 0x0000, 0x0000, 0xA900], False, False),
        ([0x0110, 0x0000, 0x0000, 0x0000], False, False),  # the Mirth case: Processing Failure
    ],
)
def test_each_response_status_is_categorised(start_scp, statuses, delivered, retryable):
    scp = start_scp(statuses=statuses)
    datasets = [sr() for _ in statuses]

    result = send(scp.destination(), datasets, timeout=10)

    assert scp.connections == 1 and scp.received == uids(datasets), "all instances over one association, in order"
    assert [(o.sop_instance_uid, o.status) for o in result.outcomes] == list(zip(uids(datasets), statuses, strict=True))
    assert [o.category for o in result.outcomes] == [status_category(s) for s in statuses]
    for outcome in result.outcomes:
        if outcome.category is Category.SUCCESS:
            assert outcome.error is None
        else:  # the status and the PACS's own Error Comment, for the audit trail
            assert outcome.error is not None and f"0x{outcome.status:04X}" in outcome.error
            assert f"test answer {outcome.status:04X}" in outcome.error
    assert (result.delivered, result.retryable) == (delivered, retryable), result.summary
    assert result.error is None


def test_success_warning_and_two_failures_in_one_association(start_scp):
    scp = start_scp(statuses=[0x0000, 0xB000, 0xA700, 0xC000])
    datasets = [sr() for _ in range(4)]
    result = send(scp.destination(), datasets, timeout=10)
    a, b, c, d = uids(datasets)
    assert by_uid(result) == {
        a: (0x0000, Category.SUCCESS),
        b: (0xB000, Category.WARNING),
        c: (0xA700, Category.FAILURE),
        d: (0xC000, Category.FAILURE),
    }
    assert [o.transient for o in result.failures] == [True, False]
    assert [o.sop_instance_uid for o in result.warnings] == [b]
    assert "Out of Resources" in result.outcomes[2].error and "Cannot Understand" in result.outcomes[3].error
    assert result.summary.startswith(f"2/4 stored on PACS@127.0.0.1:{scp.port} (1 with warnings)")


# -- association-level failures ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scp_options", "called", "reject", "reason_text"),
    [
        ({}, "WRONG", (1, 1, 7), "Called AE title not recognised"),
        ({"require_calling": ["SOMEONE"]}, "PACS", (1, 1, 3), "Calling AE title not recognised"),
    ],
)
def test_rejected_association_is_permanent(start_scp, scp_options, called, reject, reason_text):
    scp = start_scp(**scp_options)
    ds = sr()

    result = send(scp.destination(called), [ds], timeout=10)

    assert result.error is not None and result.error.kind is ErrorKind.REJECTED
    rejection = result.error.rejection
    assert rejection is not None and (rejection.result, rejection.source, rejection.reason) == reject
    assert reason_text in rejection.text and reason_text in result.error.message
    assert "Rejected Permanent" in result.error.message
    assert not result.delivered and not result.retryable and not result.error.transient
    (outcome,) = result.outcomes
    assert (outcome.sop_instance_uid, outcome.status, outcome.category) == (str(ds.SOPInstanceUID), None, Category.FAILURE)
    assert outcome.error is not None and "not sent" in outcome.error and scp.received == []


def test_busy_pacs_rejects_transiently_and_is_retryable(start_scp):
    scp = start_scp(max_associations=1)
    holder = AE(ae_title="HOLDER")
    holder.add_requested_context(Verification)
    held = holder.associate("127.0.0.1", scp.port, ae_title="PACS")
    assert held.is_established
    try:
        result = send(scp.destination(), [sr()], timeout=10)
    finally:
        held.release()
    assert result.error is not None and result.error.kind is ErrorKind.REJECTED
    assert result.error.rejection is not None and result.error.rejection.result == 2  # transient
    assert "Local limit exceeded" in result.error.message
    assert result.retryable and not result.delivered


def test_nothing_listening_is_a_retryable_connection_failure():
    port = free_port()
    started = time.monotonic()
    result = send(Destination("PACS", "127.0.0.1", port), [sr(), sr()], timeout=10)
    assert time.monotonic() - started < 3
    assert result.error is not None and result.error.kind is ErrorKind.CONNECTION_FAILED
    assert "Connection refused" in result.error.message
    assert result.retryable and not result.delivered
    assert [(o.status, o.category, o.transient) for o in result.outcomes] == [(None, Category.FAILURE, True)] * 2


def test_unresolvable_host_is_a_connection_failure():
    result = send(Destination("PACS", "no-such-host.invalid", 104), [sr()], timeout=5)
    assert result.error is not None and result.error.kind is ErrorKind.CONNECTION_FAILED
    assert "cannot resolve 'no-such-host.invalid'" in result.error.message and result.retryable


def test_pacs_that_never_answers_times_out_within_bounds(start_scp):
    scp = start_scp(hang=True)
    datasets = [sr(), sr()]
    started = time.monotonic()

    result = send(scp.destination(), datasets, timeout=1)

    elapsed = time.monotonic() - started
    assert 1 <= elapsed < 4, f"send took {elapsed:.1f} s with a 1 s timeout"
    assert result.error is not None and result.error.kind is ErrorKind.TIMEOUT and result.error.transient
    first, second = result.outcomes
    assert (first.status, first.category, first.transient) == (None, Category.FAILURE, True)
    assert first.error == "no C-STORE response within 1 s"
    assert second.error is not None and second.error.startswith("not sent") and second.transient
    assert result.retryable and not result.delivered


def test_pacs_that_aborts_during_a_store_is_retryable(start_scp):
    scp = start_scp(abort_on_store=True)
    started = time.monotonic()
    result = send(scp.destination(), [sr(), sr()], timeout=10)
    assert time.monotonic() - started < 5
    assert result.error is not None and result.error.kind is ErrorKind.ABORTED
    assert result.outcomes[0].error == "aborted before the C-STORE response"
    assert result.retryable and not result.delivered


def test_pacs_without_our_sop_class_is_permanent(start_scp):
    scp = start_scp(sop_classes=(CTImageStorage,))
    result = send(scp.destination(), [sr()], timeout=10)
    assert result.error is not None and result.error.kind is ErrorKind.NO_PRESENTATION_CONTEXT
    assert "Comprehensive SR Storage" in result.error.message
    assert not result.retryable and scp.received == []


def test_each_dataset_proposes_its_own_sop_class_and_transfer_syntax(start_scp):
    # The PACS takes Comprehensive SR but not Basic Text SR (as Weasis, the other way round).
    scp = start_scp(sop_classes=(ComprehensiveSRStorage,))
    comprehensive, basic = sr(), sr(BasicTextSRStorage)

    result = send(scp.destination(), [comprehensive, basic], timeout=10)

    assert sorted(scp.proposed) == sorted([(BasicTextSRStorage, ExplicitVRLittleEndian), (ComprehensiveSRStorage, ExplicitVRLittleEndian)])
    assert scp.received == [str(comprehensive.SOPInstanceUID)]
    ok, refused = result.outcomes
    assert ok.category is Category.SUCCESS
    assert (refused.status, refused.category, refused.transient) == (None, Category.FAILURE, False)
    assert refused.error is not None and "did not accept" in refused.error and BasicTextSRStorage in refused.error
    assert not result.delivered and not result.retryable and result.error is None


# -- TLS ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("dispatch-pki")
    ca = make_ca(folder, "ca")
    server = issue(
        folder,
        "server",
        ca,
        "/CN=127.0.0.1",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n",
    )
    client = issue(folder, "client", ca, "/CN=MEDCAP", "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n")
    other_ca, _ = make_ca(folder, "other-ca")
    return {
        "ca": ca[0],
        "server_cert": server[0],
        "server_key": server[1],
        "client_cert": client[0],
        "client_key": client[1],
        "other_ca": other_ca,
    }


def server_context(certs: dict[str, Path]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs["ca"]))
    ctx.load_cert_chain(str(certs["server_cert"]), str(certs["server_key"]))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def test_sends_over_tls_with_a_client_certificate(start_scp, certs):
    scp = start_scp(ssl_context=server_context(certs))
    tls = ClientTLS(certs["ca"], certs["client_cert"], certs["client_key"])
    ds = sr()
    result = send(scp.destination(tls=tls), [ds], timeout=10)
    assert result.delivered, result.summary
    assert scp.received == [str(ds.SOPInstanceUID)]


def test_untrusted_pacs_certificate_is_a_permanent_tls_error(start_scp, certs):
    scp = start_scp(ssl_context=server_context(certs))
    tls = ClientTLS(certs["other_ca"], certs["client_cert"], certs["client_key"])
    result = send(scp.destination(tls=tls), [sr()], timeout=10)
    assert result.error is not None and result.error.kind is ErrorKind.TLS
    assert "certificate verify failed" in result.error.message
    assert not result.retryable and scp.received == []


def test_plain_client_against_a_tls_pacs_does_not_deliver(start_scp, certs):
    scp = start_scp(ssl_context=server_context(certs))
    result = send(scp.destination(), [sr()], timeout=2)
    # The server drops the connection on our A-ASSOCIATE-RQ: indistinguishable from a PACS
    # restarting, so it is reported as an abort (retryable) rather than as a TLS problem.
    assert result.error is not None and result.error.kind is ErrorKind.ABORTED
    assert not result.delivered and scp.received == []


def test_client_tls_settings_are_checked_on_construction(certs, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(ValueError, match=r"ClientTLS.ca_file '.*missing.pem' is not a file"):
        ClientTLS(tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="ClientTLS.cert_file and ClientTLS.key_file must be given together"):
        ClientTLS(certs["ca"], certs["client_cert"])
    with pytest.raises(ValueError, match="ClientTLS.ca_file .* holds no usable CA certificate"):
        ClientTLS(garbage)
    with pytest.raises(ValueError, match="ClientTLS.cert_file/key_file .* are not a matching PEM certificate and key"):
        ClientTLS(certs["ca"], certs["client_cert"], certs["server_key"])
    with pytest.raises(TypeError, match="ClientTLS.ca_file must be a path"):
        ClientTLS(42)
    tls = ClientTLS(str(certs["ca"]))
    assert tls.ca_file == certs["ca"] and tls.context().check_hostname
    dest = Destination.parse("PACS@127.0.0.1:2762", tls=tls)
    assert dest.tls is tls and parse_destinations("A@h:1,B@h:2", tls=tls)[1].tls is tls


def test_module_imports_no_service_code():
    code = "import sys, dicom_io.store_scu; print(sorted(m for m in sys.modules if m.split('.')[0] in {'celery', 'sqlalchemy', 'service', 'fastapi', 'workers'}))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True, cwd=Path(__file__).resolve().parents[2]
    )
    assert out.stdout.strip() == "[]"


def test_tcp_nodelay_is_set_on_the_association_socket(start_scp, socket_options):
    # Without it each small C-STORE waits ~40 ms on Nagle + delayed ACK (measured here: 30 SRs
    # 1.50 s vs 0.23 s). Checked as behaviour, not as a timing: speed belongs in benchmarks/.
    scp = start_scp()
    result = send(scp.destination(), [sr() for _ in range(5)], timeout=10)
    assert result.delivered and scp.connections == 1
    assert (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1) in socket_options


def test_peer_that_accepts_tcp_but_never_answers_the_association_times_out():
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel completes the handshake; nobody reads
        port = silent.getsockname()[1]
        started = time.monotonic()
        result = send(Destination("PACS", "127.0.0.1", port), [sr()], timeout=1)
        elapsed = time.monotonic() - started
    assert 1 <= elapsed < 4, f"send took {elapsed:.1f} s with a 1 s timeout"
    assert result.error is not None and result.error.kind is ErrorKind.TIMEOUT
    assert "no answer to the association request" in result.error.message
    assert result.retryable and not result.delivered
