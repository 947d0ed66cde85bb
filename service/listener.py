"""The DICOM front door: a pynetdicom Storage SCP that admits only known peers.

Handlers stay thin (decode a handful of tags, store the raw bytes, commit a row, answer)
and never raise into pynetdicom: every failure becomes a DIMSE status and an audit event.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from typing import Any

from pynetdicom import AE, _config, evt
from pynetdicom.association import Association as PynetdicomAssociation
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_io.instance import (
    STATUS_BAD_ATTRIBUTE,
    STATUS_HANDLER_ERROR,
    InvalidInstance,
    decode_received,
    read_header,
)
from dicom_io.part10 import Part10
from dicom_io.sop_classes import ACCEPTED, TRANSFER_SYNTAXES
from service.clock import Clock, SystemClock
from service.database import Database
from service.deferred_writes import DeferredWrites
from service.ingest import Ingest, OpenAssociation
from service.pdu_guard import ConnectionGate, GuardedRequestHandler, GuardedServer, GuardLimits, networks_of
from service.refusals import RefusalLog
from service.schema import AssociationOutcome
from service.settings import Settings
from service.storage import MB

LOG = logging.getLogger(__name__)

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service user, calling AE title not recognised
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # permanent, service user, called AE title not recognised
REJECT_CONGESTION = (0x02, 0x03, 0x01)  # transient, service provider (presentation), temporary congestion


class _DeferredHandshakeContext(ssl.SSLContext):
    """Moves each TLS handshake out of pynetdicom's accept loop into the association's thread.

    pynetdicom wraps accepted sockets in its one accept loop, and a plain ``wrap_socket``
    handshakes right there on a socket with no timeout: a single peer that connects and
    says nothing (or half a ClientHello) would stop every other association. Deferred, the
    handshake runs on the association's first read, bounded by the listener's network timeout.
    """

    handshake_timeout: float | None = None

    def wrap_socket(  # type: ignore[override]
        self, sock: socket.socket, server_side: bool = False, do_handshake_on_connect: bool = True, **kwargs: Any
    ) -> ssl.SSLSocket:
        sock.settimeout(self.handshake_timeout)
        return super().wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False, **kwargs)


def server_tls_context(settings: Settings) -> ssl.SSLContext | None:
    """TLS 1.2+ with a server certificate; clients must present a certificate from our CA."""
    if not settings.tls_enabled:
        return None
    ctx = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.handshake_timeout = settings.dicom_timeout_seconds
    ctx.load_verify_locations(cafile=str(settings.tls_ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(settings.tls_cert_file), str(settings.tls_key_file))
    return ctx


class Listener:
    def __init__(self, settings: Settings, db: Database, clock: Clock | None = None, name: str | None = None) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.name = name or f"{socket.gethostname()}:{settings.dicom_port}"
        store = settings.storage
        store.prepare()
        self.deferred = DeferredWrites()
        self.ingest = Ingest(db, store, self.clock, self.name, self.deferred)
        self.refusals = RefusalLog(self._record_refusal, self.clock, self.deferred.add)
        self.gate = ConnectionGate(
            GuardLimits(
                networks=networks_of(settings.allowed_peers),
                max_connections_per_address=settings.max_connections_per_address,
                max_pending_connections=settings.max_pending_connections,
                request_timeout_seconds=settings.request_timeout_seconds,
                max_pdata_bytes=settings.max_pdu_bytes,
            )
        )
        self._open: dict[int, OpenAssociation] = {}
        self._refused: set[int] = set()
        self._slots: set[int] = set()  # associations admitted by _on_requested, until their connection ends
        self._accepting = 0  # accepts being recorded right now (their rows may exist before they are in _open)
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._server: Any = None
        self._upkeep_stop = threading.Event()
        self._upkeep_thread: threading.Thread | None = None
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        if not logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
            # pynetdicom's "standard" handlers only format DEBUG lines, on every PDU and message,
            # and raise on a request missing a field; below DEBUG they cost time and say nothing.
            _config.LOG_HANDLER_LEVEL = "none"
        ae = AE(ae_title=self.settings.dicom_ae_title)
        # Our own limit (in _on_requested) counts admitted associations only; pynetdicom's counts
        # every connection's thread, so it is set where it can never be the one that refuses.
        ae.maximum_associations = self.settings.max_associations + self.settings.max_pending_connections + 64
        ae.maximum_pdu_size = self.settings.max_pdu_bytes
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.settings.dicom_timeout_seconds
        # Title checks happen in _on_requested, so that refusals are audited.
        ae.require_called_aet = False
        for sop_class in sorted(ACCEPTED):
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        ae.add_supported_context(Verification)
        return ae

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        lost = self.ingest.close_stale_associations()
        if lost:
            LOG.warning("%d association(s) were open when this listener last stopped; marked lost", lost)
        if not self.settings.allowed_peers:
            LOG.warning("MEDCAP_ALLOWED_PEERS is empty: every association will be rejected")
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected_by_pynetdicom),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        address = (self.settings.dicom_bind_address, self.settings.dicom_port)
        # As AE.start_server(block=False), with pdu_guard's server: admission at accept, bounded reads.
        server = self.ae.make_server(
            address,
            evt_handlers=handlers,
            ssl_context=server_tls_context(self.settings),
            server_class=GuardedServer,
            request_handler=GuardedRequestHandler,
        )
        server.gate = self.gate
        server.on_refused = self._on_connection_refused
        server.on_finished = self._on_connection_finished
        server.on_invalid_store = self._on_invalid_store
        threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{self.name}", daemon=True).start()
        self.ae._servers.append(server)
        self._server = server
        self._upkeep_stop.clear()
        self._upkeep_thread = threading.Thread(target=self._upkeep_loop, name="listener-upkeep", daemon=True)
        self._upkeep_thread.start()
        LOG.info("listening as %s on %s:%d%s", self.settings.dicom_ae_title, *address, " (TLS)" if self.settings.tls_enabled else "")

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def stop(self) -> None:
        self._upkeep_stop.set()
        if self._upkeep_thread is not None:
            self._upkeep_thread.join(10)
            self._upkeep_thread = None
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        with self._lock:
            remaining = list(self._open.values())
            self._open.clear()
        for assoc in remaining:
            try:
                self.ingest.association_ended(assoc, AssociationOutcome.LOST, "listener stopped")
            except Exception:
                LOG.exception("cannot record end of association %d; the next start marks it lost", assoc.id)
        self.refusals.flush(everything=True)
        self.deferred.run()

    # -- upkeep: what could not be written at once, and rows that outlived their association ----

    UPKEEP_SECONDS = 5.0

    def _upkeep_loop(self) -> None:
        while not self._upkeep_stop.wait(self.UPKEEP_SECONDS):
            try:
                self.upkeep()
            except Exception:
                LOG.exception("listener upkeep failed; trying again in %.0f s", self.UPKEEP_SECONDS)

    def upkeep(self) -> int:
        """Retry deferred writes, write last minute's refusal tallies, close rows of associations
        that are gone; returns how many rows were closed."""
        self.refusals.flush()
        if self.deferred.run():
            return 0  # the database is still away; reconciling must wait for deferred ends
        with self._lock:
            if self._accepting:
                return 0
            live_before = {record.id for record in self._open.values()}
        newest = self.ingest.latest_association_id()
        with self._lock:
            if self._accepting:
                return 0
            live = live_before | {record.id for record in self._open.values()}
        closed = self.ingest.reconcile_open_associations(live, newest)
        if closed:
            LOG.warning("closed %d association row(s) whose end had not been recorded", closed)
        return closed

    # -- refusals ----------------------------------------------------------------------

    def _record_refusal(self, calling: str, called: str, address: str, port: int, reason: str, repeated: int | None) -> None:
        self.ingest.association_rejected(calling, called, address, port, self.settings.tls_enabled, reason, repeated)

    def _on_connection_refused(self, address: str, port: int, reason: str) -> None:
        """A connection turned away before it sent an association request (pdu_guard)."""
        LOG.warning("refusing connection from %s:%d: %s", address, port, reason)
        self.refusals.refused("", "", address, port, reason)

    # -- handlers ----------------------------------------------------------------------

    def _on_conn_open(self, event: evt.Event) -> None:
        sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
        if sock is not None:
            # Without it, small C-STORE-RSPs wait on Nagle + delayed ACK (~40 ms each).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @staticmethod
    def _peer(assoc: PynetdicomAssociation) -> tuple[str, str, str, int]:
        primitive = assoc.requestor.primitive
        calling = str(getattr(primitive, "calling_ae_title", "") or "").strip()
        called = str(getattr(primitive, "called_ae_title", "") or "").strip()
        return calling, called, str(assoc.requestor.address), int(assoc.requestor.port)

    def refusal_reason(self, calling: str, called: str, address: str) -> tuple[tuple[int, int, int], str] | None:
        if called != self.settings.dicom_ae_title:
            return REJECT_CALLED_AE, f"called AE title {called!r} is not {self.settings.dicom_ae_title!r}"
        if not any(peer.admits(calling, address) for peer in self.settings.allowed_peers):
            return REJECT_CALLING_AE, f"{calling}@{address} is not in MEDCAP_ALLOWED_PEERS"
        if not self.ingest.store.has_room():
            free_mb = self.ingest.store.free_bytes() // MB
            return REJECT_CONGESTION, f"free disk {free_mb} MB is below the reserve of {self.settings.min_free_disk_mb} MB"
        return None

    def _take_slot(self, assoc: PynetdicomAssociation) -> bool:
        """Count an admitted association toward MEDCAP_MAX_ASSOCIATIONS (released when its connection ends)."""
        with self._lock:
            if len(self._slots) >= self.settings.max_associations:
                return False
            self._slots.add(id(assoc))
            return True

    def _on_requested(self, event: evt.Event) -> None:
        try:
            calling, called, address, port = self._peer(event.assoc)
            refusal = self.refusal_reason(calling, called, address)
            if refusal is None:
                if self._take_slot(event.assoc):
                    return
                refusal = REJECT_CONGESTION, f"{self.settings.max_associations} associations are open (MEDCAP_MAX_ASSOCIATIONS)"
            (result, source, reason_code), reason = refusal
            LOG.warning("rejecting association from %s@%s: %s", calling, address, reason)
            with self._lock:
                self._refused.add(id(event.assoc))
            try:
                # Recorded first: by the time the peer hears "rejected", the audit row exists
                # (or, for a peer refused again within the minute, its tally is counted).
                self.refusals.refused(calling, called, address, port, reason)
            finally:
                self._reject(event.assoc, result, source, reason_code)
        except Exception:
            LOG.exception("association request handler failed; rejecting")
            if not event.assoc.is_rejected:
                self._reject(event.assoc, *REJECT_CONGESTION)

    @staticmethod
    def _reject(assoc: PynetdicomAssociation, result: int, source: int, reason: int) -> None:
        assoc.acse.send_reject(result, source, reason)
        # As pynetdicom's own rejections do: wait until the A-ASSOCIATE-RJ is on the wire
        # before the connection is shut down behind us.
        assoc.kill()

    def _on_accepted(self, event: evt.Event) -> None:
        calling, called, address, port = self._peer(event.assoc)
        with self._lock:
            self._accepting += 1
        try:
            try:
                record = self.ingest.association_accepted(calling, called, address, port, self.settings.tls_enabled)
            except Exception:
                LOG.exception("cannot record association; aborting it")
                event.assoc.abort()
                return
            with self._lock:
                self._open[id(event.assoc)] = record
        finally:
            with self._lock:
                self._accepting -= 1

    def _on_rejected_by_pynetdicom(self, event: evt.Event) -> None:
        with self._lock:
            if id(event.assoc) in self._refused:
                return
        calling, called, address, port = self._peer(event.assoc)
        self.refusals.refused(calling, called, address, port, "rejected by the DICOM stack (too many concurrent associations)")

    def _on_store(self, event: evt.Event) -> int:
        with self._lock:
            record = self._open.get(id(event.assoc))
        if record is None:  # accepted but not recorded (database down): refuse rather than lose
            return STATUS_HANDLER_ERROR
        try:
            request = event.request
            encoded = request.DataSet.getbuffer()
            instance = Part10.build(event.file_meta, encoded)
            transfer_syntax = str(event.context.transfer_syntax)
            try:
                # Not event.dataset: pynetdicom inflates deflated data without a limit and reads leniently.
                dataset = decode_received(encoded, transfer_syntax, self.settings.max_inflated_mb * MB)
                header = read_header(
                    dataset,
                    transfer_syntax,
                    sop_class_uid=str(request.AffectedSOPClassUID or ""),
                    sop_instance_uid=str(request.AffectedSOPInstanceUID or ""),
                )
            except InvalidInstance as exc:
                return self.ingest.refuse(record, instance, exc)
            return self.ingest.receive(record, header, instance)
        except Exception:
            LOG.exception("C-STORE handler failed")
            return STATUS_HANDLER_ERROR

    def _on_invalid_store(self, assoc: PynetdicomAssociation, request: Any) -> int:
        """A C-STORE-RQ pynetdicom would not serve (a required field is missing): refuse and record it."""
        missing = [k for k in ("AffectedSOPClassUID", "AffectedSOPInstanceUID", "Priority", "DataSet") if getattr(request, k) is None]
        reason = f"the request's {', '.join(missing)} is empty or missing"
        with self._lock:
            record = self._open.get(id(assoc))
        if record is None:
            return STATUS_HANDLER_ERROR
        try:
            data = request.DataSet.getvalue() if request.DataSet is not None else b""
            return self.ingest.refuse(record, Part10(b"", memoryview(data)), InvalidInstance(STATUS_BAD_ATTRIBUTE, reason))
        except Exception:
            LOG.exception("cannot record an invalid C-STORE request")
            return STATUS_BAD_ATTRIBUTE

    def _end(self, event: evt.Event, outcome: AssociationOutcome) -> None:
        self._end_association(event.assoc, outcome)

    def _end_association(self, assoc: PynetdicomAssociation, outcome: AssociationOutcome, reason: str | None = None) -> None:
        with self._lock:
            record = self._open.get(id(assoc))
            self._refused.discard(id(assoc))
        if record is None:
            return
        try:
            self.ingest.association_ended(record, outcome, reason)
        except Exception:
            LOG.exception("cannot record end of association %d; deferred", record.id)
            self.deferred.add(f"record the end of association {record.id}", lambda: self.ingest.association_ended(record, outcome, reason))
        with self._idle:
            self._open.pop(id(assoc), None)  # only now: wait_idle() means "recorded" (or deferred)
            self._idle.notify_all()

    def _on_connection_finished(self, assoc: PynetdicomAssociation) -> None:
        """The connection's threads are done: nothing more will happen to it.

        Its admission slot is freed, and an association whose release/abort/close event raced
        its accept being recorded (and so found no record) is ended now.
        """
        self._end_association(assoc, AssociationOutcome.ABORTED, "connection ended")
        with self._idle:
            self._slots.discard(id(assoc))
            self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every association has ended and its end is recorded.

        pynetdicom answers a release before it tells us about it, so a peer may finish
        before the database knows; this closes that gap (for draining and for tests).
        """
        with self._idle:
            # Admitted connections (slots) count too: an accept may still be being recorded.
            return self._idle.wait_for(lambda: not self._open and not self._slots, timeout)

    def _on_released(self, event: evt.Event) -> None:
        self._end(event, AssociationOutcome.RELEASED)

    def _on_aborted(self, event: evt.Event) -> None:
        self._end(event, AssociationOutcome.ABORTED)

    def _on_conn_close(self, event: evt.Event) -> None:
        # A peer that vanished without release or abort.
        self._end(event, AssociationOutcome.ABORTED)
