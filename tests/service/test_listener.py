"""The listener against real senders: dcmtk's storescu and pynetdicom SCUs on loopback."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select

from dicom_io.instance import (
    STATUS_BAD_ATTRIBUTE,
    STATUS_CANNOT_DECODE,
    STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS,
)
from service.database import Database
from service.schema import Association, AuditEvent, Instance, SeriesRecord, Study
from tests import samples
from tests.conftest import open_association, send_raw, series_files, storescu

CT = "ct-head-ge"


def count(db: Database, model: type) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def actions(db: Database) -> list[str]:
    with db.session() as s:
        return list(s.scalars(select(AuditEvent.action).order_by(AuditEvent.id)))


@pytest.mark.peers
def test_receives_a_ct_series_and_records_everything(db, listener, settings):
    files = series_files(CT)
    result = storescu(listener, files, calling="ORTHANC")
    assert result.returncode == 0, result.stderr

    with db.session() as s:
        instances = s.scalars(select(Instance)).all()
        study = s.scalars(select(Study)).one()
        assoc = s.scalars(select(Association)).one()
        assert s.scalar(select(func.count()).select_from(SeriesRecord)) == 1
    assert len(instances) == len(files)
    assert study.patient_id == "QMNx85rKkkg" and study.accession_number is None
    assert assoc.calling_ae == "ORTHANC" and assoc.outcome == "released" and assoc.instances_received == len(files)
    assert assoc.ended_at is not None and assoc.peer_address == "127.0.0.1"
    for inst in instances:
        data = Path(inst.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == inst.sha256 and len(data) == inst.size
        assert inst.captionable and inst.version_number is None
        # The stored file is the DICOM file as sent: it parses and carries the same UID.
        assert pydicom.dcmread(inst.path, stop_before_pixels=True).SOPInstanceUID == inst.sop_instance_uid
    assert not list(settings.storage.instances_dir.rglob("*.tmp"))
    assert actions(db) == ["association.accepted", "study.receiving", "association.ended"]


@pytest.mark.peers
def test_resent_study_is_idempotent(db, listener, settings):
    files = series_files(CT)[:10]
    assert storescu(listener, files).returncode == 0
    assert storescu(listener, files).returncode == 0, "a re-sent instance must get Success"
    assert count(db, Instance) == 10
    assert len(list(settings.storage.instances_dir.rglob("*.dcm"))) == 10
    with db.session() as s:
        second = s.scalars(select(Association).order_by(Association.id.desc())).first()
    assert second.instances_duplicate == 10 and second.instances_received == 0


@pytest.mark.peers
def test_changed_content_under_a_known_uid_is_kept_and_audited(db, listener, settings, tmp_path):
    original = series_files(CT)[0]
    assert storescu(listener, [original]).returncode == 0
    ds = pydicom.dcmread(original)
    ds.StudyDescription = "HEAD CORRECTED"
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed)
    assert storescu(listener, [changed]).returncode == 0
    with db.session() as s:
        inst = s.scalars(select(Instance)).one()
        replaced = s.scalars(select(AuditEvent).where(AuditEvent.action == "instance.replaced")).one()
    assert inst.sha256 == hashlib.sha256(Path(inst.path).read_bytes()).hexdigest()
    assert replaced.details["old_sha256"] != replaced.details["new_sha256"] == inst.sha256
    assert len(list(settings.storage.instances_dir.rglob("*.dcm"))) == 2, "the first payload is kept, not overwritten"


@pytest.mark.peers
def test_unknown_calling_ae_is_rejected_and_audited(db, start_listener, make_settings):
    listener = start_listener(make_settings(allowed_peers="ORTHANC@127.0.0.1/32"))
    result = storescu(listener, series_files(CT)[:1], calling="INTRUDER")
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stderr + result.stdout
    with db.session() as s:
        assoc = s.scalars(select(Association)).one()
        event = s.scalars(select(AuditEvent)).one()
    assert assoc.outcome == "rejected" and "INTRUDER@127.0.0.1" in assoc.reason
    assert event.action == "association.rejected" and event.actor == "dicom:INTRUDER@127.0.0.1"
    assert count(db, Instance) == 0


@pytest.mark.peers
def test_allowed_ae_from_another_network_is_rejected(db, start_listener, make_settings):
    listener = start_listener(make_settings(allowed_peers="ORTHANC@10.1.0.0/16"))
    assert storescu(listener, series_files(CT)[:1], calling="ORTHANC").returncode != 0
    assert actions(db) == ["association.rejected"]


@pytest.mark.peers
def test_wrong_called_ae_is_rejected(db, listener):
    result = storescu(listener, series_files(CT)[:1], called="NOTMEDCAP")
    assert result.returncode != 0 and "Called AE Title Not Recognized" in result.stderr + result.stdout
    with db.session() as s:
        assert "called AE title 'NOTMEDCAP'" in s.scalars(select(Association.reason)).one()


def _send_files(port: int, files: list[Path]) -> list[int]:
    assoc = open_association(port, "BADSENDER")
    try:
        return send_raw(assoc, files)
    finally:
        assoc.release()


@pytest.mark.peers
def test_malformed_instances_get_failure_statuses_while_another_association_is_served(db, listener, settings, tmp_path):
    source = series_files(CT)[0]
    bad = [
        samples.garbage(source, tmp_path / "garbage.dcm"),
        samples.truncated(source, tmp_path / "truncated.dcm"),
        samples.without_pixel_data(source, tmp_path / "nopixels.dcm"),
    ]
    good = series_files(CT)
    results: dict[str, object] = {}
    sender = threading.Thread(target=lambda: results.update(good=storescu(listener, good)))
    sender.start()
    statuses = _send_files(listener.port, bad)
    sender.join()

    assert statuses[0] in (STATUS_CANNOT_DECODE, STATUS_BAD_ATTRIBUTE)
    assert statuses[1] == STATUS_CANNOT_DECODE
    assert statuses[2] == STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert results["good"].returncode == 0
    assert count(db, Instance) == len(good)
    with db.session() as s:
        failures = s.scalars(select(AuditEvent).where(AuditEvent.action == "instance.failed")).all()
        bad_assoc = s.scalars(select(Association).where(Association.calling_ae == "BADSENDER")).one()
    assert len(failures) == 3 and bad_assoc.instances_failed == 3
    assert "truncated" in failures[1].details["reason"]
    # Nothing a peer sent is dropped: the refused bytes are kept in quarantine.
    for failure in failures:
        kept = Path(failure.details["quarantined"]).read_bytes()
        assert hashlib.sha256(kept).hexdigest() == failure.details["sha256"]
    # ...and the listener still answers.
    ae = AE(ae_title="ECHO")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="MEDCAP")
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    assoc.release()


@pytest.mark.peers
def test_association_refused_below_disk_reserve(db, start_listener, make_settings):
    settings = make_settings(min_free_disk_mb=10**9)  # a reserve no disk can meet
    listener = start_listener(settings)
    result = storescu(listener, series_files(CT)[:3])
    assert result.returncode != 0
    assert count(db, Instance) == 0
    assert not any(p.is_file() for p in settings.storage.instances_dir.rglob("*"))
    with db.session() as s:
        assoc = s.scalars(select(Association)).one()
    assert assoc.outcome == "rejected" and "below the reserve" in assoc.reason


@pytest.mark.peers
def test_disk_filling_mid_association_fails_cleanly(db, start_listener, make_settings, small_disk):
    settings = make_settings(data_dir=small_disk, min_free_disk_mb=0)
    listener = start_listener(settings)
    files = series_files(CT)  # ~525 kB each: the 4 MB disk fills after a few
    storescu(listener, files, extra=["--no-halt"])  # exits non-zero: some instances got 0xA700
    with db.session() as s:
        stored = s.scalars(select(Instance)).all()
        failures = s.scalars(select(AuditEvent).where(AuditEvent.action == "instance.failed")).all()
    assert 0 < len(stored) < len(files)
    assert len(stored) + len(failures) == len(files)
    assert all(f.details["status"] == "0xA700" for f in failures)
    # Every stored file is whole and has its row; no temporary or orphan files remain.
    on_disk = {str(p) for p in settings.storage.instances_dir.rglob("*") if p.is_file()}
    assert on_disk == {i.path for i in stored}
    for inst in stored:
        assert hashlib.sha256(Path(inst.path).read_bytes()).hexdigest() == inst.sha256


def test_stopping_the_listener_closes_open_associations_as_lost(db, start_listener, settings):
    listener = start_listener(settings)
    ae = AE(ae_title="SLOW")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="MEDCAP")
    assert assoc.is_established
    listener.stop()
    assoc.abort()
    with db.session() as s:
        row = s.scalars(select(Association)).one()
    assert row.ended_at is not None and row.outcome in ("lost", "aborted")


def test_compressed_images_and_companion_classes_are_stored_as_sent(db, listener):
    from pydicom.data import get_testdata_file

    files = {
        name: Path(get_testdata_file(name)) for name in ("MR_small_jp2klossless.dcm", "SC_rgb_rle.dcm", "JPEG-lossy.dcm", "test-SR.dcm")
    }
    statuses = []
    for path in files.values():  # one association per file, proposing exactly its class and syntax
        ds = pydicom.dcmread(path)
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", listener.port, ae_title="MEDCAP")
        assert assoc.is_established
        statuses.append(assoc.send_c_store(ds).Status)
        assoc.release()
        assert listener.wait_idle(30)
    assert statuses == [0, 0, 0, 0]
    with db.session() as s:
        rows = {r.sop_instance_uid: r for r in s.scalars(select(Instance))}
    for name, path in files.items():
        ds = pydicom.dcmread(path)
        row = rows[ds.SOPInstanceUID]
        assert row.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID, name
        assert row.captionable is name.startswith("MR_"), "SR and secondary capture are kept, never captioned"
        if "PixelData" in ds:  # compressed pixel data is kept byte for byte, to be decoded later
            assert pydicom.dcmread(row.path).PixelData == ds.PixelData


@pytest.mark.peers
def test_tcp_nodelay_is_set_on_accepted_sockets(db, listener, socket_options):
    # Nagle + delayed ACK would add ~40 ms to every C-STORE-RSP (environment note); speed itself
    # is measured in benchmarks/receive.py, here only the behaviour is checked.
    import socket

    assert storescu(listener, series_files(CT)[:1]).returncode == 0
    assert (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1) in socket_options
