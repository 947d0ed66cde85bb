"""Sending MedCap's SR documents to a PACS: one association per call, every C-STORE response checked.

A send never raises for network trouble: it returns a :class:`DispatchResult` saying, per instance,
what the PACS answered, and whether a later retry may succeed. Senders that do not check each
response report success for instances the PACS refused (Mirth Connect #3858/#4266 after A700/0110,
weasis-dicom-tools #4 after A900); here only Success and Warning statuses count as delivered.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS
from pynetdicom.transport import AddressInformation, AssociationSocket

from dicom_io.ae_title import validate_ae_title

LOG = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_RESOURCE_LIMITATION = 0x0213  # PS3.7 Annex C: as transient as Out of Resources
MAX_PRESENTATION_CONTEXTS = 128  # PS3.8 9.3.2.2: odd context IDs 1-255

_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


# -- destinations --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientTLS:
    """DICOM TLS towards a PACS (PS3.15 B.1): verify its certificate against ``ca_file``; present ours if given.

    The context is built once on construction, so that unreadable or mismatched PEM files fail
    when the setting is loaded rather than at the first send.
    """

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None

    def __post_init__(self) -> None:
        for name in ("ca_file", "cert_file", "key_file"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, str | Path):
                raise TypeError(f"ClientTLS.{name} must be a path, got {type(value).__name__}")
            object.__setattr__(self, name, Path(value))
            if not Path(value).is_file():
                raise ValueError(f"ClientTLS.{name} {str(value)!r} is not a file")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("ClientTLS.cert_file and ClientTLS.key_file must be given together")
        self.context()

    def context(self) -> ssl.SSLContext:
        """A TLS 1.2+ client context that checks the PACS certificate and host name."""
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file))
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"ClientTLS.ca_file {str(self.ca_file)!r} holds no usable CA certificate: {exc}") from exc
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file is not None:
            try:
                ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(
                    f"ClientTLS.cert_file/key_file {str(self.cert_file)!r}/{str(self.key_file)!r} "
                    f"are not a matching PEM certificate and key: {exc}"
                ) from exc
        return ctx


@dataclass(frozen=True)
class Destination:
    """A PACS that receives our SRs: its called AE title, address and optional TLS settings."""

    ae_title: str
    host: str
    port: int
    tls: ClientTLS | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", validate_ae_title(self.ae_title, "Destination.ae_title"))
        if not isinstance(self.host, str) or not _valid_host(self.host):
            raise ValueError(f"Destination.host must be an IP address or a host name, got {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ValueError(f"Destination.port must be an integer in 1-65535, got {self.port!r}")
        if self.tls is not None and not isinstance(self.tls, ClientTLS):
            raise TypeError(f"Destination.tls must be a ClientTLS or None, got {type(self.tls).__name__}")

    @classmethod
    def parse(cls, text: str, *, tls: ClientTLS | None = None) -> Destination:
        """``"AE@host:port"`` (``"AE@[::1]:port"`` for IPv6) as a Destination."""
        if not isinstance(text, str):
            raise TypeError(f"a destination must be a str, got {type(text).__name__}")
        ae_title, at, address = text.strip().rpartition("@")
        host, colon, port = address.rpartition(":")
        if not at or not colon:
            raise ValueError(f"destination {text!r} must look like AE_TITLE@host:port")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ValueError(f"destination {text!r}: write an IPv6 host in brackets, as AE@[::1]:104")
        if not port.isdigit():
            raise ValueError(f"Destination.port must be an integer in 1-65535, got {port!r} in {text!r}")
        return cls(ae_title, host, int(port), tls)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


def parse_destinations(text: str, *, tls: ClientTLS | None = None) -> tuple[Destination, ...]:
    """A comma-separated list of destinations (the ``MEDCAP_DESTINATIONS`` form); blank means none."""
    entries = [entry.strip() for entry in text.split(",")] if text.strip() else []
    destinations: list[Destination] = []
    for number, entry in enumerate(entries, start=1):
        try:
            destination = Destination.parse(entry, tls=tls)
        except ValueError as exc:
            raise ValueError(f"destination {number} of {len(entries)}: {exc}") from exc
        if destination in destinations:
            raise ValueError(f"destination {number} of {len(entries)}: {entry!r} is listed twice")
        destinations.append(destination)
    return tuple(destinations)


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    return 0 < len(name) <= 253 and all(_HOST_LABEL.match(label) for label in name.split("."))


# -- results -------------------------------------------------------------------------------------


class Category(StrEnum):
    SUCCESS = "success"
    WARNING = "warning"  # stored, perhaps altered (coerced, elements discarded): delivered
    FAILURE = "failure"


def status_category(status: int) -> Category:
    """PS3.4 B.2.3 / PS3.7 C: 0x0000 success; 0x0001 and 0xBxxx warnings; everything else a failure."""
    if status == STATUS_SUCCESS:
        return Category.SUCCESS
    if status == 0x0001 or 0xB000 <= status <= 0xBFFF:
        return Category.WARNING
    return Category.FAILURE


def status_is_transient(status: int) -> bool:
    """Failure statuses a later retry may overcome: Out of Resources (0xA7xx) and Resource Limitation."""
    return 0xA700 <= status <= 0xA7FF or status == STATUS_RESOURCE_LIMITATION


def describe_status(status: int) -> str:
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(status, ("", ""))[1]
    return f"0x{status:04X} {meaning}".rstrip()


@dataclass(frozen=True)
class InstanceOutcome:
    """What happened to one instance: the C-STORE-RSP status, or ``None`` when no response came."""

    sop_instance_uid: str
    status: int | None
    category: Category
    error: str | None = None  # the status meaning and the peer's Error Comment, or why nothing was answered
    transient: bool = False  # for a failure: whether a retry may succeed

    @property
    def delivered(self) -> bool:
        return self.category is not Category.FAILURE


class ErrorKind(StrEnum):
    CONNECTION_FAILED = "connection_failed"  # refused, unreachable, unresolvable host
    TIMEOUT = "timeout"  # no TCP connection, A-ASSOCIATE-AC or C-STORE-RSP within the timeout
    REJECTED = "rejected"  # A-ASSOCIATE-RJ
    ABORTED = "aborted"  # A-ABORT from the peer, or the connection closed under us
    NO_PRESENTATION_CONTEXT = "no_presentation_context"  # accepted, but none of our SOP class/transfer syntax pairs
    TLS = "tls"  # handshake failed: certificates or protocol, which needs a person to fix


@dataclass(frozen=True)
class Rejection:
    """The A-ASSOCIATE-RJ fields (PS3.8 9.3.4) and their meaning."""

    result: int  # 1 permanent, 2 transient
    source: int  # 1 service user, 2 ACSE provider, 3 presentation provider
    reason: int
    text: str

    @property
    def transient(self) -> bool:
        return self.result == 0x02


@dataclass(frozen=True)
class AssociationError:
    kind: ErrorKind
    message: str
    transient: bool
    rejection: Rejection | None = None


@dataclass(frozen=True)
class DispatchResult:
    """The outcome of one :func:`send`: one :class:`InstanceOutcome` per dataset, in the order given."""

    destination: Destination
    outcomes: tuple[InstanceOutcome, ...]
    error: AssociationError | None = None  # what stopped the association, if anything did
    seconds: float = 0.0

    @property
    def delivered(self) -> bool:
        """Every instance was stored (Success or Warning)."""
        return bool(self.outcomes) and all(o.delivered for o in self.outcomes)

    @property
    def retryable(self) -> bool:
        """Not delivered, and nothing that failed failed for good: sending again later may succeed."""
        if self.delivered:
            return False
        if self.error is not None and not self.error.transient:
            return False
        return all(o.delivered or o.transient for o in self.outcomes)

    @property
    def warnings(self) -> tuple[InstanceOutcome, ...]:
        return tuple(o for o in self.outcomes if o.category is Category.WARNING)

    @property
    def failures(self) -> tuple[InstanceOutcome, ...]:
        return tuple(o for o in self.outcomes if o.category is Category.FAILURE)

    @property
    def summary(self) -> str:
        stored = sum(o.delivered for o in self.outcomes)
        text = f"{stored}/{len(self.outcomes)} stored on {self.destination}"
        if self.warnings:
            text += f" ({len(self.warnings)} with warnings)"
        if self.error is not None:
            text += f"; {self.error.kind}: {self.error.message}"
        elif self.failures:
            text += f"; first failure: {self.failures[0].error}"
        return text


# -- sending -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    dataset: Dataset
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str

    @classmethod
    def load(cls, source: Dataset | Path, index: int) -> _Item:
        name = f"datasets[{index}]"
        ds: Dataset
        if isinstance(source, str | Path):
            try:
                ds = dcmread(source)
            except (OSError, InvalidDicomError) as exc:
                raise ValueError(f"{name} ({str(source)!r}) cannot be read as DICOM: {exc}") from exc
            name = f"{name} ({str(source)!r})"
        elif isinstance(source, Dataset):
            ds = source
        else:
            raise TypeError(f"{name} must be a pydicom Dataset or a Path, got {type(source).__name__}")
        values = {}
        for keyword, where in (("SOPClassUID", ds), ("SOPInstanceUID", ds), ("TransferSyntaxUID", getattr(ds, "file_meta", None))):
            value = str(getattr(where, keyword, "") or "").strip()
            if not value:
                raise ValueError(f"{name} has no {keyword}" + (" in its file meta" if keyword == "TransferSyntaxUID" else ""))
            values[keyword] = value
        return cls(ds, values["SOPClassUID"], values["SOPInstanceUID"], values["TransferSyntaxUID"])


class _Socket(AssociationSocket):
    """Keeps the OSError behind a failed connect, which pynetdicom only logs.

    pynetdicom (3.0) closes the socket from inside its ``except OSError`` block, so the
    exception being handled there is the reason: connection refused, timed out, or TLS.
    """

    connect_error: OSError | None = None

    def _shutdown_socket(self) -> None:
        if not self._is_connected and self.connect_error is None:
            exc = sys.exc_info()[1]
            if isinstance(exc, OSError):
                self.connect_error = exc
        super()._shutdown_socket()


class _AE(AE):
    def _create_socket(
        self, assoc: Association, address: AddressInformation, tls_args: tuple[ssl.SSLContext, str] | None
    ) -> AssociationSocket:
        sock = _Socket(assoc, address=address)
        sock.tls_args = tls_args
        return sock


def send(
    destination: Destination, datasets: Sequence[Dataset | Path], *, calling_ae: str = "MEDCAP", timeout: float = 30
) -> DispatchResult:
    """C-STORE ``datasets`` to ``destination`` over one association and report what the PACS answered.

    Each dataset is proposed with exactly its own SOP class and transfer syntax (no conversion),
    and sent as it is. ``timeout`` (seconds) bounds each network step: the TCP connection (and TLS
    handshake), the association reply, each C-STORE response, and any single socket write.

    Raises ValueError/TypeError only for bad arguments (no datasets, unreadable files, missing
    UIDs, an invalid calling AE title); network problems are reported in the result.
    """
    if not isinstance(destination, Destination):
        raise TypeError(f"destination must be a Destination, got {type(destination).__name__}")
    calling_ae = validate_ae_title(calling_ae, "calling_ae")
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    items = [_Item.load(source, i) for i, source in enumerate(datasets)]
    if not items:
        raise ValueError("datasets must not be empty")
    seen: set[str] = set()
    for item in items:
        if item.sop_instance_uid in seen:
            raise ValueError(f"datasets holds SOPInstanceUID {item.sop_instance_uid} more than once")
        seen.add(item.sop_instance_uid)
    pairs = sorted({(item.sop_class_uid, item.transfer_syntax_uid) for item in items})
    if len(pairs) > MAX_PRESENTATION_CONTEXTS:
        raise ValueError(f"datasets need {len(pairs)} presentation contexts; one association carries at most {MAX_PRESENTATION_CONTEXTS}")

    started = time.monotonic()
    outcomes, error = _exchange(destination, items, pairs, calling_ae, timeout)
    unsent_reason = f"not sent ({error.kind})" if error is not None else "not sent"
    unsent = [
        InstanceOutcome(item.sop_instance_uid, None, Category.FAILURE, unsent_reason, error is None or error.transient)
        for item in items[len(outcomes) :]
    ]
    result = DispatchResult(destination, tuple(outcomes + unsent), error, time.monotonic() - started)
    (LOG.info if result.delivered else LOG.warning)("%s in %.2f s", result.summary, result.seconds)
    return result


def _exchange(
    destination: Destination, items: Sequence[_Item], pairs: Sequence[tuple[str, str]], calling_ae: str, timeout: float
) -> tuple[list[InstanceOutcome], AssociationError | None]:
    """Associate, store ``items`` in order until the association ends, release."""
    tls_args = (destination.tls.context(), destination.host) if destination.tls is not None else None
    try:
        address = _resolve(destination.host, destination.port)
    except OSError as exc:
        return [], AssociationError(ErrorKind.CONNECTION_FAILED, f"cannot resolve {destination.host!r}: {exc}", transient=True)

    ae = _AE(ae_title=calling_ae)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class, syntax in pairs:
        ae.add_requested_context(sop_class, [syntax])

    opened_at: list[float] = []

    def on_open(event: evt.Event) -> None:
        opened_at.append(time.monotonic())
        sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
        if sock is not None:
            # Without it, each small C-STORE-RQ/RSP exchange waits on Nagle + delayed ACK (~40 ms).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # pynetdicom leaves the socket blocking after connecting: a PACS that stops reading
            # would hold a send forever. With a timeout, pynetdicom treats it as a closed connection.
            sock.settimeout(timeout)

    assoc = ae.associate(
        address, destination.port, ae_title=destination.ae_title, tls_args=tls_args, evt_handlers=[(evt.EVT_CONN_OPEN, on_open)]
    )
    if not assoc.is_established:
        return [], _association_failure(assoc, destination, timeout, opened_at[0] if opened_at else None)

    outcomes: list[InstanceOutcome] = []
    try:
        for item in items:
            outcome, ended = _store(assoc, item, timeout)
            outcomes.append(outcome)
            if ended is not None:
                message = f"association ended while sending {item.sop_instance_uid}: {outcome.error}"
                return outcomes, AssociationError(ended, message, transient=True)
        return outcomes, None
    finally:
        if assoc.is_established:
            assoc.release()
            if assoc.is_aborted:  # every response is in hand, so only worth a line in the log
                LOG.warning("%s: A-RELEASE was not confirmed; the association was aborted", destination)
        else:
            assoc.abort()


def _resolve(host: str, port: int) -> str:
    """The host's first address: pynetdicom takes IP addresses only (a name is not looked up)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return str(infos[0][4][0])


def _accepted_context(assoc: Association, item: _Item) -> PresentationContext | None:
    for cx in assoc.accepted_contexts:
        if cx.abstract_syntax == item.sop_class_uid and cx.transfer_syntax and cx.transfer_syntax[0] == item.transfer_syntax_uid:
            return cx
    return None


def _store(assoc: Association, item: _Item, timeout: float) -> tuple[InstanceOutcome, ErrorKind | None]:
    """One C-STORE; the second value says how the association ended if no response came."""
    uid = item.sop_instance_uid
    if _accepted_context(assoc, item) is None:
        # Checked here because pynetdicom would otherwise fall back to a converted transfer syntax.
        text = f"the PACS did not accept {item.sop_class_uid} in {item.transfer_syntax_uid}"
        return InstanceOutcome(uid, None, Category.FAILURE, text), None
    started = time.monotonic()
    try:
        rsp = assoc.send_c_store(item.dataset)
    except RuntimeError:
        if assoc.is_established:
            raise
        # The peer aborted after the previous response, before this request went out.
        return InstanceOutcome(uid, None, Category.FAILURE, "aborted before the C-STORE request", True), ErrorKind.ABORTED
    if "Status" not in rsp:
        # pynetdicom returns an empty status both after its DIMSE timeout (when it aborts) and
        # when the peer aborts or closes; only the time taken tells them apart.
        if time.monotonic() - started >= timeout * 0.95:
            return InstanceOutcome(uid, None, Category.FAILURE, f"no C-STORE response within {timeout:g} s", True), ErrorKind.TIMEOUT
        return InstanceOutcome(uid, None, Category.FAILURE, "aborted before the C-STORE response", True), ErrorKind.ABORTED
    status = int(rsp.Status)
    category = status_category(status)
    if category is Category.SUCCESS:
        return InstanceOutcome(uid, status, category), None
    text = describe_status(status)
    comment = str(rsp.get("ErrorComment", "") or "").strip()
    if comment:
        text += f": {comment}"
    transient = category is Category.FAILURE and status_is_transient(status)
    return InstanceOutcome(uid, status, category, text, transient), None


def _association_failure(assoc: Association, destination: Destination, timeout: float, opened_at: float | None) -> AssociationError:
    sock = assoc.dul.socket
    connect_error = sock.connect_error if isinstance(sock, _Socket) else None
    rj = assoc.acceptor.primitive
    if assoc.is_rejected and rj is not None:
        result, source, reason = int(rj.result or 0), int(rj.result_source or 0), int(rj.diagnostic or 0)
        text = f"{rj.result_str}, {rj.source_str}: {rj.reason_str}"
        rejection = Rejection(result, source, reason, text)
        message = f"{destination} rejected the association ({text}; result/source/reason {result}/{source}/{reason})"
        return AssociationError(ErrorKind.REJECTED, message, rejection.transient, rejection)
    if isinstance(connect_error, ssl.SSLError):
        return AssociationError(ErrorKind.TLS, f"TLS handshake with {destination} failed: {connect_error}", transient=False)
    if isinstance(connect_error, TimeoutError):
        return AssociationError(ErrorKind.TIMEOUT, f"no TCP connection to {destination} within {timeout:g} s", transient=True)
    if connect_error is not None:
        return AssociationError(ErrorKind.CONNECTION_FAILED, f"cannot connect to {destination}: {connect_error}", transient=True)
    if assoc.acceptor.primitive is not None and not assoc.accepted_contexts:
        proposed = ", ".join(
            f"{cx.abstract_syntax.name if cx.abstract_syntax else '?'} in {cx.transfer_syntax[0].name}" for cx in assoc.rejected_contexts
        )
        return AssociationError(ErrorKind.NO_PRESENTATION_CONTEXT, f"{destination} accepted none of: {proposed}", transient=False)
    if opened_at is not None and time.monotonic() - opened_at >= timeout * 0.95:  # pynetdicom's ACSE timeout
        return AssociationError(
            ErrorKind.TIMEOUT, f"no answer to the association request from {destination} within {timeout:g} s", transient=True
        )
    return AssociationError(ErrorKind.ABORTED, f"{destination} aborted or closed the connection during association", transient=True)
