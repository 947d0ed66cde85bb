"""Receipt of instances: persist the bytes, commit the row, then (and only then) say Success.

Everything here is called from the listener's DICOM handlers, in the association's thread.
Each method commits its own transaction, with its audit events inside it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dicom_io.instance import (
    STATUS_BAD_ATTRIBUTE,
    STATUS_OUT_OF_RESOURCES,
    InstanceHeader,
    InvalidInstance,
)
from service import audit
from service.audit import Action
from service.clock import Clock
from service.database import Database, insert_ignoring_conflicts
from service.instance_store import InstanceStore
from service.schema import Association, AssociationOutcome, Instance, Series, Study

LOG = logging.getLogger(__name__)
SUCCESS = 0x0000


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
    # series UID -> (study id, series id), so only the first instance of a series upserts.
    series_ids: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def actor(self) -> str:
        return audit.dicom_actor(self.calling_ae, self.address)


class Ingest:
    def __init__(self, db: Database, store: InstanceStore, clock: Clock, listener_name: str) -> None:
        self.db = db
        self.store = store
        self.clock = clock
        self.listener_name = listener_name
        self._close_lock = threading.Lock()

    # -- associations ---------------------------------------------------------------

    def association_accepted(self, calling_ae: str, called_ae: str, address: str, port: int, tls: bool) -> OpenAssociation:
        now = self.clock.now()
        with self.db.session() as s:
            row = Association(
                calling_ae=calling_ae, called_ae=called_ae, peer_address=address, peer_port=port, tls=tls,
                started_at=now, listener=self.listener_name, outcome=AssociationOutcome.OPEN.value,
                instances_received=0, instances_duplicate=0, instances_failed=0,
            )  # fmt: skip
            s.add(row)
            s.flush()
            audit.record(s, now, audit.dicom_actor(calling_ae, address), Action.ASSOCIATION_ACCEPTED, "association", row.id,
                         called_ae=called_ae, port=port, tls=tls)  # fmt: skip
            return OpenAssociation(row.id, calling_ae, address)

    def association_rejected(self, calling_ae: str, called_ae: str, address: str, port: int, tls: bool, reason: str) -> None:
        now = self.clock.now()
        with self.db.session() as s:
            row = Association(
                calling_ae=calling_ae, called_ae=called_ae, peer_address=address, peer_port=port, tls=tls,
                started_at=now, ended_at=now, listener=self.listener_name, outcome=AssociationOutcome.REJECTED.value,
                reason=reason, instances_received=0, instances_duplicate=0, instances_failed=0,
            )  # fmt: skip
            s.add(row)
            s.flush()
            audit.record(s, now, audit.dicom_actor(calling_ae, address), Action.ASSOCIATION_REJECTED, "association", row.id,
                         called_ae=called_ae, port=port, reason=reason)  # fmt: skip

    def association_ended(self, assoc: OpenAssociation, outcome: AssociationOutcome, reason: str | None = None) -> None:
        with self._close_lock:  # released and connection-closed events may both arrive
            if assoc.closed:
                return
            assoc.closed = True
        now = self.clock.now()
        with self.db.session() as s:
            s.execute(
                update(Association).where(Association.id == assoc.id).values(
                    ended_at=now, outcome=outcome.value, reason=reason, instances_received=assoc.received,
                    instances_duplicate=assoc.duplicate, instances_failed=assoc.failed,
                )
            )  # fmt: skip
            audit.record(s, now, assoc.actor, Action.ASSOCIATION_ENDED, "association", assoc.id, outcome=outcome.value,
                         received=assoc.received, duplicate=assoc.duplicate, failed=assoc.failed, reason=reason)  # fmt: skip

    def close_stale_associations(self) -> int:
        """Mark associations this listener left open (it crashed or was killed) as lost."""
        now = self.clock.now()
        with self.db.session() as s:
            stale = s.scalars(
                select(Association.id).where(Association.ended_at.is_(None), Association.listener == self.listener_name)
            ).all()
            for assoc_id in stale:
                s.execute(update(Association).where(Association.id == assoc_id).values(
                    ended_at=now, outcome=AssociationOutcome.LOST.value, reason="listener stopped while the association was open"))  # fmt: skip
                audit.record(s, now, audit.SYSTEM_LISTENER, Action.ASSOCIATION_LOST, "association", assoc_id, listener=self.listener_name)
        return len(stale)

    # -- instances --------------------------------------------------------------------

    def receive(self, assoc: OpenAssociation, header: InstanceHeader, data: bytes) -> int:
        """Store one valid instance; return the DIMSE status to send."""
        sha256 = hashlib.sha256(data).hexdigest()
        existing = self._existing(header.sop_instance_uid)
        if existing is not None and existing[1] == sha256:
            assoc.duplicate += 1  # re-sent: already safe on disk and in the database
            return SUCCESS
        if not self.store.has_room(len(data)):
            return self._fail(assoc, data, sha256, STATUS_OUT_OF_RESOURCES, "free disk below the reserve", keep=False)
        path = self.store.path_for(header, sha256)
        try:
            self.store.write(path, data)
        except OSError as exc:
            return self._fail(assoc, data, sha256, STATUS_OUT_OF_RESOURCES, f"cannot write instance: {exc}", keep=False)
        try:
            with self.db.session() as s:
                self._record_instance(s, assoc, header, path, len(data), sha256, existing)
        except InvalidInstance as exc:
            path.unlink(missing_ok=True)
            return self._fail(assoc, data, sha256, exc.status, exc.reason)
        except IntegrityError:
            # The same instance arrived on another association in the meantime.
            again = self._existing(header.sop_instance_uid)
            if again is not None and again[1] == sha256:
                assoc.duplicate += 1
                return SUCCESS
            path.unlink(missing_ok=True)
            return self._fail(assoc, data, sha256, STATUS_OUT_OF_RESOURCES, "concurrent conflicting write, retry")
        except Exception as exc:
            LOG.exception("database error storing %s", header.sop_instance_uid)
            path.unlink(missing_ok=True)
            return self._fail(assoc, data, sha256, STATUS_OUT_OF_RESOURCES, f"database error: {type(exc).__name__}", keep=False)
        assoc.received += 1
        return SUCCESS

    def refuse(self, assoc: OpenAssociation, data: bytes, error: InvalidInstance) -> int:
        """Record an instance that failed validation, keep its bytes in quarantine, return its status."""
        return self._fail(assoc, data, hashlib.sha256(data).hexdigest(), error.status, error.reason)

    def _existing(self, sop_instance_uid: str) -> tuple[int, str] | None:
        with self.db.session() as s:
            row = s.execute(select(Instance.id, Instance.sha256).where(Instance.sop_instance_uid == sop_instance_uid)).first()
            return (row[0], row[1]) if row else None

    def _record_instance(
        self, s: Session, assoc: OpenAssociation, header: InstanceHeader, path: object, size: int, sha256: str,
        existing: tuple[int, str] | None,
    ) -> None:  # fmt: skip
        now = self.clock.now()
        study_id, series_id = assoc.series_ids.get(header.series_uid) or self._upsert_study_and_series(s, assoc, header, now)
        values = dict(
            sop_class_uid=header.sop_class_uid, transfer_syntax_uid=header.transfer_syntax_uid, study_id=study_id,
            series_id=series_id, association_id=assoc.id, captionable=header.captionable, path=str(path), size=size,
            sha256=sha256, received_at=now, version_number=None,
        )  # fmt: skip
        if existing is None:
            s.add(Instance(sop_instance_uid=header.sop_instance_uid, **values))
            s.flush()
        else:
            # New content under a known UID: keep the old file, point at the new one, and make
            # the instance pending again so the study gets a new version.
            old_id, old_sha = existing
            s.execute(update(Instance).where(Instance.id == old_id).values(**values))
            audit.record(s, now, assoc.actor, Action.INSTANCE_REPLACED, "instance", header.sop_instance_uid,
                         study_uid=header.study_uid, old_sha256=old_sha, new_sha256=sha256, association_id=assoc.id)  # fmt: skip

    def _upsert_study_and_series(self, s: Session, assoc: OpenAssociation, header: InstanceHeader, now: object) -> tuple[int, int]:
        created = insert_ignoring_conflicts(
            s, Study.__table__,
            dict(study_uid=header.study_uid, patient_id=header.patient_id, patient_name=header.patient_name,
                 accession_number=header.accession_number, study_date=header.study_date,
                 study_description=header.study_description, first_received_at=now),
            "study_uid",
        )  # fmt: skip
        study_id = s.scalar(select(Study.id).where(Study.study_uid == header.study_uid))
        assert study_id is not None
        if created:
            audit.record(s, now, assoc.actor, Action.STUDY_RECEIVING, "study", header.study_uid, study_uid=header.study_uid,  # type: ignore[arg-type]
                         association_id=assoc.id, patient_id=header.patient_id, accession_number=header.accession_number)  # fmt: skip
        insert_ignoring_conflicts(
            s, Series.__table__,
            dict(study_id=study_id, series_uid=header.series_uid, modality=header.modality,
                 series_number=header.series_number, series_description=header.series_description),
            "series_uid",
        )  # fmt: skip
        series_study_id, series_id = s.execute(select(Series.study_id, Series.id).where(Series.series_uid == header.series_uid)).one()
        if series_study_id != study_id:
            raise InvalidInstance(STATUS_BAD_ATTRIBUTE, f"series {header.series_uid} already belongs to another study")
        assoc.series_ids[header.series_uid] = (study_id, series_id)
        return study_id, series_id

    def _fail(self, assoc: OpenAssociation, data: bytes, sha256: str, status: int, reason: str, keep: bool = True) -> int:
        assoc.failed += 1
        now = self.clock.now()
        kept: str | None = None
        if keep and self.store.has_room(len(data)):
            try:
                kept = str(self.store.quarantine(data, assoc.id, now, sha256))
            except OSError:
                LOG.exception("cannot quarantine refused instance")
        LOG.warning("refused instance from %s: 0x%04X %s", assoc.actor, status, reason)
        try:
            with self.db.session() as s:
                audit.record(s, now, assoc.actor, Action.INSTANCE_FAILED, "association", assoc.id,
                             status=f"0x{status:04X}", reason=reason, sha256=sha256, size=len(data), quarantined=kept)  # fmt: skip
        except Exception:
            LOG.exception("cannot record refused instance in the audit database")
        return status
