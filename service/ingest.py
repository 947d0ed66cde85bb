"""Receipt of instances: persist the bytes, commit the row, then (and only then) say Success.

Everything here is called from the listener's DICOM handlers, in the association's thread.
Each method commits its own transaction, with its audit events inside it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dicom_io.instance import (
    STATUS_BAD_ATTRIBUTE,
    STATUS_OUT_OF_RESOURCES,
    InstanceHeader,
    InvalidInstance,
)
from dicom_io.part10 import Part10
from service import audit
from service.audit import Action
from service.clock import Clock
from service.database import Database, insert_ignoring_conflicts
from service.deferred_writes import DeferredWrites
from service.schema import Association, AssociationOutcome, Instance, SeriesRecord, Study
from service.storage import Storage

LOG = logging.getLogger(__name__)
SUCCESS = 0x0000
#: Pauses between tries to record an association's end before it is left to the upkeep (a blip
#: of the database should not leave the row open until the listener restarts).
END_RETRY_PAUSES = (0.2, 0.5, 1.0)


@dataclass
class OpenAssociation:
    """What the listener keeps in memory for one accepted association."""

    id: int
    calling_ae: str
    address: str
    received: int = 0
    duplicate: int = 0
    failed: int = 0
    closed: bool = False
    ending: tuple[AssociationOutcome, str | None] | None = None  # the first end seen, kept while its recording is retried
    # series UID -> (study id, series id), so only the first instance of a series upserts.
    series_ids: dict[str, tuple[int, int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def actor(self) -> str:
        return audit.dicom_actor(self.calling_ae, self.address)


class Ingest:
    def __init__(self, db: Database, store: Storage, clock: Clock, listener_name: str, deferred: DeferredWrites | None = None) -> None:
        self.db = db
        self.store = store
        self.clock = clock
        self.listener_name = listener_name
        self.deferred = deferred if deferred is not None else DeferredWrites()

    # -- associations ---------------------------------------------------------------

    def association_accepted(self, calling_ae: str, called_ae: str, address: str, port: int, tls: bool) -> OpenAssociation:
        now = self.clock.now()
        with self.db.session() as s:
            row = Association(
                calling_ae=calling_ae,
                called_ae=called_ae,
                peer_address=address,
                peer_port=port,
                tls=tls,
                started_at=now,
                listener=self.listener_name,
                outcome=AssociationOutcome.OPEN.value,
                instances_received=0,
                instances_duplicate=0,
                instances_failed=0,
            )
            s.add(row)
            s.flush()
            audit.record(
                s,
                now,
                audit.dicom_actor(calling_ae, address),
                Action.ASSOCIATION_ACCEPTED,
                "association",
                row.id,
                called_ae=called_ae,
                port=port,
                tls=tls,
            )
            return OpenAssociation(row.id, calling_ae, address)

    def association_rejected(
        self, calling_ae: str, called_ae: str, address: str, port: int, tls: bool, reason: str, repeated: int | None = None
    ) -> None:
        now = self.clock.now()
        with self.db.session() as s:
            row = Association(
                calling_ae=calling_ae,
                called_ae=called_ae,
                peer_address=address,
                peer_port=port,
                tls=tls,
                started_at=now,
                ended_at=now,
                listener=self.listener_name,
                outcome=AssociationOutcome.REJECTED.value,
                reason=reason,
                instances_received=0,
                instances_duplicate=0,
                instances_failed=0,
            )
            s.add(row)
            s.flush()
            audit.record(
                s,
                now,
                audit.dicom_actor(calling_ae, address),
                Action.ASSOCIATION_REJECTED,
                "association",
                row.id,
                called_ae=called_ae,
                port=port,
                reason=reason,
                **({"repeated": repeated} if repeated else {}),
            )

    def association_ended(self, assoc: OpenAssociation, outcome: AssociationOutcome, reason: str | None = None) -> None:
        # Released/aborted and connection-closed events arrive from different threads; the
        # second waits until the first has recorded the end, then does nothing.
        with assoc.lock:
            if assoc.closed:
                return
            if assoc.ending is None:
                assoc.ending = (outcome, reason)
            outcome, reason = assoc.ending
            for pause in (*END_RETRY_PAUSES, None):
                try:
                    self._record_end(assoc, outcome, reason)
                    break
                except Exception:
                    if pause is None:
                        raise
                    LOG.warning("cannot record end of association %d yet; retrying in %.1f s", assoc.id, pause)
                    time.sleep(pause)
            assoc.closed = True

    def reconcile_open_associations(self, live: set[int], since_before: int) -> int:
        """Close this listener's rows that are open in the database but belong to no live association.

        ``live`` are the ids the listener holds; only rows with ids up to ``since_before`` are
        considered (those were committed before the listener took its snapshot of ``live``).
        """
        now = self.clock.now()
        with self.db.session() as s:
            stale = [
                assoc_id
                for assoc_id in s.scalars(
                    select(Association.id).where(
                        Association.ended_at.is_(None), Association.listener == self.listener_name, Association.id <= since_before
                    )
                )
                if assoc_id not in live
            ]
            for assoc_id in stale:
                s.execute(
                    update(Association)
                    .where(Association.id == assoc_id, Association.ended_at.is_(None))
                    .values(ended_at=now, outcome=AssociationOutcome.LOST.value, reason="ended while its end could not be recorded")
                )
                audit.record(s, now, audit.SYSTEM_LISTENER, Action.ASSOCIATION_LOST, "association", assoc_id, listener=self.listener_name)
        return len(stale)

    def latest_association_id(self) -> int:
        with self.db.session() as s:
            return int(s.scalar(select(func.max(Association.id))) or 0)

    def _record_end(self, assoc: OpenAssociation, outcome: AssociationOutcome, reason: str | None) -> None:
        now = self.clock.now()
        with self.db.session() as s:
            s.execute(
                update(Association)
                .where(Association.id == assoc.id)
                .values(
                    ended_at=now,
                    outcome=outcome.value,
                    reason=reason,
                    instances_received=assoc.received,
                    instances_duplicate=assoc.duplicate,
                    instances_failed=assoc.failed,
                )
            )
            audit.record(
                s,
                now,
                assoc.actor,
                Action.ASSOCIATION_ENDED,
                "association",
                assoc.id,
                outcome=outcome.value,
                received=assoc.received,
                duplicate=assoc.duplicate,
                failed=assoc.failed,
                reason=reason,
            )

    def close_stale_associations(self) -> int:
        """Mark associations this listener left open (it crashed or was killed) as lost."""
        now = self.clock.now()
        with self.db.session() as s:
            stale = s.scalars(
                select(Association.id).where(Association.ended_at.is_(None), Association.listener == self.listener_name)
            ).all()
            for assoc_id in stale:
                s.execute(
                    update(Association)
                    .where(Association.id == assoc_id)
                    .values(ended_at=now, outcome=AssociationOutcome.LOST.value, reason="listener stopped while the association was open")
                )
                audit.record(s, now, audit.SYSTEM_LISTENER, Action.ASSOCIATION_LOST, "association", assoc_id, listener=self.listener_name)
        return len(stale)

    # -- instances --------------------------------------------------------------------

    def receive(self, assoc: OpenAssociation, header: InstanceHeader, instance: Part10) -> int:
        """Store one valid instance; return the DIMSE status to send.

        File first (named by content hash, so a re-send lands on the same name), then one
        transaction that checks for an earlier copy and records the instance.
        """
        sha256 = instance.sha256
        path = self.store.instance_path(header, sha256)
        fresh_file = not self.store.exists(path)  # exists: a re-send, or a crash after write, before commit
        if fresh_file:
            if not self.store.has_room(instance.size):
                return self._fail(assoc, instance, STATUS_OUT_OF_RESOURCES, "free disk below the reserve", keep=False)
            try:
                self.store.write(path, *instance.chunks)
            except OSError as exc:
                return self._fail(assoc, instance, STATUS_OUT_OF_RESOURCES, f"cannot write instance: {exc}", keep=False)
        try:
            with self.db.session() as s:
                duplicate = self._record_instance(s, assoc, header, path, instance.size, sha256)
        except InvalidInstance as exc:
            self._discard(path, fresh_file, header.sop_instance_uid, sha256)
            return self._fail(assoc, instance, exc.status, exc.reason)
        except IntegrityError:
            # The same instance arrived on another association in the meantime.
            if self._stored_as(header.sop_instance_uid) == sha256:
                assoc.duplicate += 1
                return SUCCESS
            self._discard(path, fresh_file, header.sop_instance_uid, sha256)
            return self._fail(assoc, instance, STATUS_OUT_OF_RESOURCES, "concurrent conflicting write, retry")
        except Exception as exc:
            LOG.exception("database error storing %s", header.sop_instance_uid)
            self._discard(path, fresh_file, header.sop_instance_uid, sha256)
            return self._fail(assoc, instance, STATUS_OUT_OF_RESOURCES, f"database error: {type(exc).__name__}", keep=False)
        if duplicate:
            assoc.duplicate += 1  # re-sent: already safe on disk and in the database
        else:
            assoc.received += 1
        return SUCCESS

    def refuse(self, assoc: OpenAssociation, instance: Part10, error: InvalidInstance) -> int:
        """Record an instance that failed validation, keep its bytes in quarantine, return its status."""
        return self._fail(assoc, instance, error.status, error.reason)

    def _stored_as(self, sop_instance_uid: str) -> str | None:
        with self.db.session() as s:
            return s.scalar(select(Instance.sha256).where(Instance.sop_instance_uid == sop_instance_uid))

    def _discard(self, path: Path, fresh_file: bool, sop_instance_uid: str, sha256: str) -> None:
        """Remove a file we wrote whose row did not commit, unless another association's row now
        points at the same content (then it is theirs). When in doubt, keep it: an orphan file
        is harmless, a lost one is not."""
        if not fresh_file:
            return
        try:
            self._discard_unless_recorded(path, sop_instance_uid, sha256)
        except Exception:
            # The database is away: check again when it is back, so no file stays without a row.
            self.deferred.add(f"remove {path} unless recorded", lambda: self._discard_unless_recorded(path, sop_instance_uid, sha256))

    def _discard_unless_recorded(self, path: Path, sop_instance_uid: str, sha256: str) -> None:
        if self._stored_as(sop_instance_uid) != sha256:
            self.store.delete(path)

    def _record_instance(self, s: Session, assoc: OpenAssociation, header: InstanceHeader, path: Path, size: int, sha256: str) -> bool:
        """Insert (or replace) the instance row; returns True if this exact content was already recorded."""
        now = self.clock.now()
        study_id, series_id = assoc.series_ids.get(header.series_uid) or self._upsert_study_and_series(s, assoc, header, now)
        values = dict(
            sop_class_uid=header.sop_class_uid,
            transfer_syntax_uid=header.transfer_syntax_uid,
            study_id=study_id,
            series_id=series_id,
            association_id=assoc.id,
            captionable=header.captionable,
            path=str(path),
            size=size,
            sha256=sha256,
            received_at=now,
            version_number=None,
        )
        # The common case, a new instance, costs one statement.
        if insert_ignoring_conflicts(s, Instance.__table__, dict(sop_instance_uid=header.sop_instance_uid, **values), "sop_instance_uid"):
            return False
        existing = s.execute(select(Instance.id, Instance.sha256).where(Instance.sop_instance_uid == header.sop_instance_uid)).one()
        if existing.sha256 == sha256:
            return True
        # New content under a known UID: keep the old file, point at the new one, and make
        # the instance pending again so the study gets a new version.
        s.execute(update(Instance).where(Instance.id == existing.id).values(**values))
        audit.record(
            s,
            now,
            assoc.actor,
            Action.INSTANCE_REPLACED,
            "instance",
            header.sop_instance_uid,
            study_uid=header.study_uid,
            old_sha256=existing.sha256,
            new_sha256=sha256,
            association_id=assoc.id,
        )
        return False

    def _upsert_study_and_series(self, s: Session, assoc: OpenAssociation, header: InstanceHeader, now: object) -> tuple[int, int]:
        created = insert_ignoring_conflicts(
            s,
            Study.__table__,
            dict(
                study_uid=header.study_uid,
                patient_id=header.patient_id,
                patient_name=header.patient_name,
                accession_number=header.accession_number,
                study_date=header.study_date,
                study_description=header.study_description,
                first_received_at=now,
            ),
            "study_uid",
        )
        study_id = s.scalar(select(Study.id).where(Study.study_uid == header.study_uid))
        assert study_id is not None
        if created:
            audit.record(
                s,
                now,
                assoc.actor,
                Action.STUDY_RECEIVING,
                "study",
                header.study_uid,
                study_uid=header.study_uid,
                association_id=assoc.id,
                patient_id=header.patient_id,
                accession_number=header.accession_number,
            )
        insert_ignoring_conflicts(
            s,
            SeriesRecord.__table__,
            dict(
                study_id=study_id,
                series_uid=header.series_uid,
                modality=header.modality,
                series_number=header.series_number,
                series_description=header.series_description,
            ),
            "series_uid",
        )
        series_study_id, series_id = s.execute(
            select(SeriesRecord.study_id, SeriesRecord.id).where(SeriesRecord.series_uid == header.series_uid)
        ).one()
        if series_study_id != study_id:
            raise InvalidInstance(STATUS_BAD_ATTRIBUTE, f"series {header.series_uid} already belongs to another study")
        assoc.series_ids[header.series_uid] = (study_id, series_id)
        return study_id, series_id

    def _fail(self, assoc: OpenAssociation, instance: Part10, status: int, reason: str, keep: bool = True) -> int:
        assoc.failed += 1
        now = self.clock.now()
        kept: str | None = None
        if keep and self.store.has_room(instance.size):
            try:
                kept = str(self.store.quarantine(instance, assoc.id, now))
            except OSError:
                LOG.exception("cannot quarantine refused instance")
        LOG.warning("refused instance from %s: 0x%04X %s", assoc.actor, status, reason)
        sha256, size = instance.sha256, instance.size

        def record() -> None:
            with self.db.session() as s:
                audit.record(
                    s,
                    now,
                    assoc.actor,
                    Action.INSTANCE_FAILED,
                    "association",
                    assoc.id,
                    status=f"0x{status:04X}",
                    reason=reason,
                    sha256=sha256,
                    size=size,
                    quarantined=kept,
                )

        try:
            record()
        except Exception:
            LOG.warning("cannot record refused instance in the audit database now; deferred")
            self.deferred.add(f"record refused instance {sha256[:12]} of association {assoc.id}", record)
        return status
