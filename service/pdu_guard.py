"""What happens on the DICOM port before an association exists: admission at accept, bounded reads.

pynetdicom offers no hook for either, so this module subclasses three of its classes:

- ``GuardedServer`` (its ``ThreadedAssociationServer``) decides at ``accept()``, before a thread
  or any limit is spent on the connection: the address must be in an allowed network, and one
  address may hold at most ``max_connections_per_address`` connections, and all addresses together
  at most ``max_pending_connections`` that have not yet sent their A-ASSOCIATE-RQ.
- ``GuardedRequestHandler`` gives each connection ``request_timeout_seconds`` to send its request.
- ``GuardedDUL`` replaces pynetdicom's ``DULServiceProvider._read_pdu_data``, which reads whatever
  length a PDU header announces: here the length is checked first (an A-ASSOCIATE-RQ and every
  other control PDU at most ``MAX_CONTROL_PDU_BYTES``, a P-DATA-TF at most the maximum PDU size we
  negotiated) and the association is aborted, without reading the body, when it is larger.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

LOG = logging.getLogger(__name__)

#: A-ASSOCIATE-RQ/AC/RJ, A-RELEASE and A-ABORT PDUs. A request proposing every class we accept
#: with every transfer syntax is ~20 kB; dcmtk, too, refuses association PDUs far below a megabyte.
MAX_CONTROL_PDU_BYTES = 64 * 1024
#: With ``MEDCAP_MAX_PDU_BYTES=0`` ("unlimited" to peers) a P-DATA-TF is still read into memory whole.
MAX_PDATA_BYTES_UNLIMITED = 64 * 1024 * 1024
P_DATA_TF = 0x04
_KNOWN_PDU_TYPES = frozenset(range(0x01, 0x08))
_ESTABLISHED_STATES = frozenset({"Sta6", "Sta7", "Sta8", "Sta9", "Sta10", "Sta11", "Sta12"})
# A-ABORT from the service provider, reason "invalid PDU parameter value" (PS3.8 9.3.8).
_ABORT_INVALID_PARAMETER = bytes([0x07, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x02, 0x06])
_ABORT_UNRECOGNISED_PDU = bytes([0x07, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x02, 0x01])

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: (address, port, reason): a connection turned away before it became an association.
RefusalHook = Callable[[str, int, str], None]


@dataclass(frozen=True)
class GuardLimits:
    networks: tuple[Network, ...]
    max_connections_per_address: int
    max_pending_connections: int
    request_timeout_seconds: float
    max_pdata_bytes: int

    def __post_init__(self) -> None:
        if self.max_connections_per_address < 1:
            raise ValueError(f"max_connections_per_address must be at least 1, not {self.max_connections_per_address}")
        if self.max_pending_connections < 1:
            raise ValueError(f"max_pending_connections must be at least 1, not {self.max_pending_connections}")
        if self.request_timeout_seconds <= 0:
            raise ValueError(f"request_timeout_seconds must be positive, not {self.request_timeout_seconds}")
        if self.max_pdata_bytes < 0:
            raise ValueError(f"max_pdata_bytes must not be negative, not {self.max_pdata_bytes}")

    @property
    def pdata_limit(self) -> int:
        return self.max_pdata_bytes or MAX_PDATA_BYTES_UNLIMITED

    def address_allowed(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.networks)


class ConnectionGate:
    """Counts connections per address and those still waiting to send their request."""

    def __init__(self, limits: GuardLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._per_address: Counter[str] = Counter()
        self._pending: set[tuple[str, int]] = set()

    def admit(self, address: str, port: int) -> str | None:
        """Count the connection and return None, or return why it is turned away (and count nothing)."""
        if not self.limits.address_allowed(address):
            return f"address {address} is not in any MEDCAP_ALLOWED_PEERS network"
        with self._lock:
            if self._per_address[address] >= self.limits.max_connections_per_address:
                return f"{address} already holds {self.limits.max_connections_per_address} connections (MEDCAP_MAX_CONNECTIONS_PER_ADDRESS)"
            if len(self._pending) >= self.limits.max_pending_connections:
                return f"{len(self._pending)} connections are waiting to send a request (MEDCAP_MAX_PENDING_CONNECTIONS)"
            self._per_address[address] += 1
            self._pending.add((address, port))
        return None

    def requested(self, address: str, port: int) -> None:
        with self._lock:
            self._pending.discard((address, port))

    def closed(self, address: str, port: int) -> None:
        with self._lock:
            self._pending.discard((address, port))
            self._per_address[address] -= 1
            if self._per_address[address] <= 0:
                del self._per_address[address]

    def counts(self) -> tuple[int, int]:
        """(connections, of which pending) — for tests and the fuzz harness."""
        with self._lock:
            return sum(self._per_address.values()), len(self._pending)


class GuardedDUL(DULServiceProvider):
    """pynetdicom's DUL with PDU lengths checked before a body is read."""

    gate: ConnectionGate
    on_refused: RefusalHook
    acse_timeout_after_request: float | None
    _request_deadline: float
    reported = False  # a refusal of this connection is already on record
    request_seen = False  # its A-ASSOCIATE-RQ has arrived

    def _peer(self) -> tuple[str, int]:
        info = self.assoc.requestor.address_info
        return (str(info.address), int(info.port)) if info is not None else ("?", 0)

    def _recv(self, sock: socket.socket, buffer: memoryview, deadline: float | None) -> bool:
        """Fill ``buffer`` from the socket; False if the peer closed, errored, went quiet for the
        network timeout, or (before its request is in) ran past ``deadline``."""
        got = 0
        try:
            while got < len(buffer):
                if deadline is not None:  # per call only until the request is in: it costs a syscall
                    timeout = min(self.idle_timeout, deadline - time.monotonic())
                    if timeout <= 0:
                        return False
                    sock.settimeout(timeout)
                n = sock.recv_into(buffer[got:])
                if not n:
                    return False
                got += n
            return True
        except (OSError, TimeoutError):
            return False

    @property
    def idle_timeout(self) -> float:
        return float(self.assoc.network_timeout or 60.0)

    def _abort_unread(self, abort_pdu: bytes, reason: str, established: bool) -> None:
        """Abort without reading what follows: tell the peer, close, and let the state machine see it closed."""
        address, port = self._peer()
        LOG.warning("aborting connection from %s:%d: %s", address, port, reason)
        assoc_socket = self.socket
        raw = assoc_socket.socket if assoc_socket is not None else None
        if raw is not None:
            try:
                raw.settimeout(1.0)
                raw.sendall(abort_pdu)
                raw.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.reported = True
        if not established:
            # An established association's end is recorded (aborted) by the listener;
            # before that, this is the only trace the connection leaves.
            try:
                self.on_refused(address, port, reason)
            except Exception:
                LOG.exception("cannot record refused connection")
        self.event_queue.put("Evt17")

    def _read_pdu_data(self) -> None:
        assoc_socket = self.socket
        raw = assoc_socket.socket if assoc_socket is not None else None
        if raw is None:
            self.event_queue.put("Evt17")
            return
        state = self.state_machine.current_state
        established = state in _ESTABLISHED_STATES
        # Until the request is in, every byte must arrive before the request deadline. (Not
        # "state is Sta2": the first read may come before the state machine has seen Evt5.)
        deadline = None if self.request_seen else self._request_deadline
        header = bytearray(6)
        if not self._recv(raw, memoryview(header), deadline):
            self.event_queue.put("Evt17")
            return
        pdu_type, _, length = struct.unpack(">BBL", header)
        if pdu_type not in _KNOWN_PDU_TYPES:
            self._abort_unread(_ABORT_UNRECOGNISED_PDU, f"unknown PDU type 0x{pdu_type:02X}", established)
            return
        limit = self.limits_for(pdu_type, established)
        if length > limit:
            self._abort_unread(
                _ABORT_INVALID_PARAMETER, f"PDU type 0x{pdu_type:02X} announces {length} bytes, more than the {limit} allowed", established
            )
            return
        pdu = bytearray(6 + length)
        pdu[:6] = header
        if not self._recv(raw, memoryview(pdu)[6:], deadline):
            LOG.warning("connection closed or timed out before the whole PDU (%d bytes) arrived", 6 + length)
            self.event_queue.put("Evt17")
            return
        try:
            decoded, event = self._decode_pdu(pdu)
        except Exception as exc:
            LOG.warning("cannot decode PDU type 0x%02X of %d bytes: %s", pdu_type, length, exc)
            self.event_queue.put("Evt19")
            return
        if pdu_type == 0x01 and not self.request_seen:
            self.request_seen = True
            # From now on a read may wait the network timeout (pynetdicom's accepted sockets block forever).
            with contextlib.suppress(OSError):
                raw.settimeout(self.idle_timeout)
            self.gate.requested(*self._peer())
            self.assoc.acse_timeout = self.acse_timeout_after_request
        self.event_queue.put(event)
        self._recv_pdu.put(decoded)

    def limits_for(self, pdu_type: int, established: bool) -> int:
        if pdu_type == P_DATA_TF and established:
            return self.gate.limits.pdata_limit
        return MAX_CONTROL_PDU_BYTES


class GuardedRequestHandler(RequestHandler):
    """One accepted connection: a guarded DUL, a short deadline for its request, and its count released at the end."""

    server: GuardedServer

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        dul = GuardedDUL(assoc)
        dul.gate = self.server.gate
        dul.on_refused = self.server.on_refused
        dul.acse_timeout_after_request = self.ae.acse_timeout
        dul._request_deadline = time.monotonic() + self.server.gate.limits.request_timeout_seconds
        assoc._serve_request = self._answering(assoc, assoc._serve_request)  # type: ignore[method-assign,assignment]
        dul.socket = assoc.dul.socket
        dul.event_queue = assoc.dul.event_queue  # holds Evt5 (connection open) from set_socket()
        assoc.dul = dul
        # The acceptor waits this long for the A-ASSOCIATE-RQ (GuardedDUL restores it once it arrives).
        assoc.acse_timeout = self.server.gate.limits.request_timeout_seconds
        return assoc

    def _answering(self, assoc: Any, serve: Callable[[Any, int], None]) -> Callable[[Any, int], None]:
        """pynetdicom ignores a C-STORE-RQ missing a required field (a blank Affected SOP Instance
        UID) and the sender waits for its timeout; here it gets a failure status instead."""

        def serve_request(msg: Any, context_id: int) -> None:
            if not isinstance(msg, C_STORE) or msg.is_valid_request:
                serve(msg, context_id)
                return
            if msg.MessageID is None:
                LOG.warning("C-STORE-RQ without a Message ID: aborting the association")
                assoc.abort()
                return
            status = self.server.on_invalid_store(assoc, msg)
            rsp = C_STORE()
            rsp.MessageIDBeingRespondedTo = msg.MessageID
            rsp.AffectedSOPClassUID = msg.AffectedSOPClassUID
            rsp.AffectedSOPInstanceUID = msg.AffectedSOPInstanceUID
            rsp.Status = status
            assoc.dimse.send_msg(rsp, context_id)

        return serve_request

    def handle(self) -> None:
        address, port = str(self.client_address[0]), int(self.client_address[1])
        assoc = None
        try:
            assoc = self._create_association()
            from pynetdicom import evt

            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
            assoc.join()  # this thread lives as long as the connection, to release its count
            if assoc.requestor.primitive is None and not getattr(assoc.dul, "reported", False):
                self.server.on_refused(
                    address, port, f"no association request within {self.server.gate.limits.request_timeout_seconds:g} s"
                )
        finally:
            # pynetdicom leaves the socket of a connection that ended before an association
            # (timeout, bad PDU) to the garbage collector: close it now, so the peer sees it closed.
            self.server.shutdown_request(self.request)
            self.server.gate.closed(address, port)
            if assoc is not None:
                try:
                    self.server.on_finished(assoc)
                except Exception:
                    LOG.exception("connection end handler failed")


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with admission decided at accept."""

    gate: ConnectionGate
    on_refused: RefusalHook
    on_finished: Callable[[Any], None]
    on_invalid_store: Callable[[Any, Any], int]  # (association, C-STORE-RQ) -> failure status to answer

    def verify_request(self, request: Any, client_address: Any) -> bool:
        address, port = str(client_address[0]), int(client_address[1])
        reason = self.gate.admit(address, port)
        if reason is None:
            return True
        try:
            self.on_refused(address, port, reason)
        except Exception:
            LOG.exception("cannot record refused connection")
        return False


def networks_of(peers: Iterable[Any]) -> tuple[Network, ...]:
    """The distinct networks of the allow-list entries (any AE title)."""
    return tuple(dict.fromkeys(peer.network for peer in peers))
