"""A STOW-RS request's life: admitted or refused, each instance through the C-STORE ingest path, ended.

A request is recorded as an ``associations`` row (called AE ``STOW-RS``, calling AE the client's
name) from the moment it is admitted until its response is decided. That is what makes it a sender
to the assembler: a study with pending instances from an open row is not stable, exactly as with an
open DICOM association, and rows a crashed web process left open are marked lost when it restarts.
Instances go through :class:`service.ingest.Ingest` unchanged: file written and fsynced, row
committed, each before the response; refused bytes quarantined; duplicates recognised by hash.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

from sqlalchemy import update

from dicom_io.instance import STATUS_HANDLER_ERROR
from service import audit
from service.audit import Action
from service.clock import Clock
from service.database import Database
from service.dicomweb_clients import Client, DicomwebClients, Refusal
from service.ingest import Ingest, OpenAssociation
from service.schema import Association, AssociationOutcome
from service.settings import Settings
from service.stow import InstanceOutcome, Part, decode_part

LOG = logging.getLogger(__name__)
CALLED = "STOW-RS"  # associations.called_ae of STOW-RS requests


@dataclass
class StowRequest(OpenAssociation):
    """An admitted STOW-RS request, in the shape the ingest path counts instances on."""

    @property
    def actor(self) -> str:
        return audit.dicomweb_actor(self.calling_ae, self.address)


class StowRequests:
    def __init__(self, settings: Settings, db: Database, clock: Clock, name: str | None = None) -> None:
        self.db = db
        self.clock = clock
        self.max_bytes = settings.dicomweb_max_request_mb * 1024 * 1024
        self.idle_timeout = settings.dicom_timeout_seconds
        # Like a listener's name, it says whose open rows are stale after a restart.
        self.name = name or f"{socket.gethostname()}:web:{settings.web_port}"
        store = settings.storage
        store.prepare()
        self.ingest = Ingest(db, store, clock, self.name)
        self.clients = DicomwebClients(db, clock)

    def close_stale(self) -> int:
        """Mark requests this web process left open when it stopped (crash, kill) as lost."""
        return self.ingest.close_stale_associations()

    def authenticate(self, authorization: str | None, address: str) -> Client | Refusal:
        return self.clients.authenticate(authorization, address)

    def has_room(self) -> bool:
        return self.ingest.store.has_room()

    def refused(self, client: str | None, address: str, port: int, method_path: str, status: int, reason: str) -> None:
        """Audit a request turned away before anything was read from it."""
        now = self.clock.now()
        LOG.warning("refused STOW-RS request from %s (%s): %d %s", address, client or "unknown client", status, reason)
        with self.db.session() as s:
            audit.record(
                s,
                now,
                audit.dicomweb_actor(client or "?", address),
                Action.STOW_REFUSED,
                "route",
                method_path[:128],  # the path is the sender's: it must not break the audit row
                http_status=status,
                reason=reason,
                port=port,
            )

    def open(self, client: Client, address: str, port: int, tls: bool, method_path: str, study_uid: str | None) -> StowRequest:
        now = self.clock.now()
        with self.db.session() as s:
            row = Association(
                calling_ae=client.name,
                called_ae=CALLED,
                peer_address=address,
                peer_port=port,
                tls=tls,
                started_at=now,
                listener=self.name,
                outcome=AssociationOutcome.OPEN.value,
                instances_received=0,
                instances_duplicate=0,
                instances_failed=0,
            )
            s.add(row)
            s.flush()
            request = StowRequest(row.id, client.name, address)
            audit.record(
                s,
                now,
                request.actor,
                Action.STOW_STARTED,
                "association",
                row.id,
                study_uid=study_uid,
                route=method_path,
                port=port,
                tls=tls,
            )
        return request

    def store(self, request: StowRequest, part: Part, study_uid: str | None) -> InstanceOutcome:
        """One part: validated as C-STORE validates, then stored (or refused) by the ingest path."""
        try:
            decoded = decode_part(part, study_uid)
            if decoded.header is None:
                assert decoded.error is not None
                status = self.ingest.refuse(request, decoded.instance, decoded.error)
                return InstanceOutcome(decoded.sop_class_uid, decoded.sop_instance_uid, status, decoded.error.reason)
            status = self.ingest.receive(request, decoded.header, decoded.instance)
            return InstanceOutcome(decoded.sop_class_uid, decoded.sop_instance_uid, status, None if status == 0 else "not stored")
        except Exception:  # as in the C-STORE handler: one bad instance never takes the request down
            LOG.exception("STOW-RS part handler failed")
            request.failed += 1
            return InstanceOutcome(None, None, STATUS_HANDLER_ERROR, "internal error")

    def close(self, request: StowRequest, outcome: AssociationOutcome, http_status: int | None, reason: str | None = None) -> None:
        """Record the end; from here the assembler no longer waits for this request."""
        now = self.clock.now()
        with request.lock:
            if request.closed:
                return
            with self.db.session() as s:
                s.execute(
                    update(Association)
                    .where(Association.id == request.id)
                    .values(
                        ended_at=now,
                        outcome=outcome.value,
                        reason=reason,
                        instances_received=request.received,
                        instances_duplicate=request.duplicate,
                        instances_failed=request.failed,
                    )
                )
                audit.record(
                    s,
                    now,
                    request.actor,
                    Action.STOW_ENDED,
                    "association",
                    request.id,
                    outcome=outcome.value,
                    http_status=http_status,
                    received=request.received,
                    duplicate=request.duplicate,
                    failed=request.failed,
                    reason=reason,
                )
            request.closed = True
