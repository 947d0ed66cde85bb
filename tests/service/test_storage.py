"""service/storage.py: the data directory's layout, its atomic writes and its reads, on real files."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest

from dicom_io.instance import InstanceHeader, read_header
from dicom_io.part10 import Part10
from service.settings import SettingsError, load_settings
from service.storage import MB, Area, Storage, StorageError, StoredFileMissing
from tests.conftest import series_files

CT = series_files("ct-head-ge")[:3]
NOW = datetime(2026, 12, 5, 9, 30, tzinfo=UTC)


def received(path: Path) -> tuple[InstanceHeader, Part10]:
    """A sample file as the listener has it: its header, and the Part 10 bytes split after the file meta."""
    raw = path.read_bytes()
    ds = pydicom.dcmread(path)
    meta_end = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    header = read_header(
        ds, str(ds.file_meta.TransferSyntaxUID), sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=str(ds.SOPInstanceUID)
    )
    return header, Part10(raw[:meta_end], memoryview(raw)[meta_end:])


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return Storage(tmp_path / "data")


def everything_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


# -- construction ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("root", "min_free", "field"),
    [
        ("", 0, "Storage root"),
        (None, 0, "Storage root"),
        (42, 0, "Storage root"),
        ("data", -1, "Storage min_free_bytes"),
        ("data", True, "Storage min_free_bytes"),
        ("data", 1.5, "Storage min_free_bytes"),
    ],
)
def test_the_constructor_names_the_bad_field(root, min_free, field):
    with pytest.raises(StorageError, match=f"^{field}: "):
        Storage(root, min_free_bytes=min_free)


def test_a_root_that_is_a_file_is_refused_and_stops_the_settings(tmp_path):
    a_file = tmp_path / "not-a-folder"
    a_file.write_bytes(b"")
    with pytest.raises(StorageError, match="Storage root: .*not-a-folder exists and is not a folder"):
        Storage(a_file)
    with pytest.raises(SettingsError, match="data_dir: Storage root: .*not-a-folder"):
        load_settings(data_dir=a_file)


def test_the_settings_hand_out_the_data_dir_with_the_free_space_reserve(tmp_path):
    settings = load_settings(data_dir=tmp_path / "data", min_free_disk_mb=7)
    assert settings.storage == Storage(tmp_path / "data", min_free_bytes=7 * MB)
    assert settings.storage.instances_dir == tmp_path / "data" / "instances"


def test_prepare_makes_the_folders(storage):
    storage.prepare()
    assert sorted(p.name for p in storage.root.iterdir()) == ["instances", "quarantine", "reports"]


# -- names: UIDs come from the network ------------------------------------------------------


@pytest.mark.parametrize(
    "uid",
    ["..", "../../etc", "1.2/../../x", "1.2.3/4", "/abs", "1..2", "1.2.", ".1", "", "1.2.3\x00", "1" * 65, "1.2.3 ", "１.２"],
)
def test_uids_that_are_not_uids_never_reach_a_path(storage, uid):
    header, instance = received(CT[0])
    for field in ("study_uid", "series_uid", "sop_instance_uid"):
        with pytest.raises(StorageError, match=f"^{field}: .* is not a DICOM UID"):
            storage.instance_path(dataclasses.replace(header, **{field: uid}), instance.sha256)
    with pytest.raises(StorageError, match="^study_uid: "):
        storage.report_path(uid, "1.2.3")
    with pytest.raises(StorageError, match="^sop_instance_uid: "):
        storage.report_path("1.2.3", uid)
    assert not storage.root.exists(), "nothing is written for a refused name"


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_an_sr_with_a_hostile_uid_is_not_written(storage, tmp_path):
    sr = pydicom.dcmread(CT[0])
    sr.SOPInstanceUID = "../../../escaped"
    with pytest.raises(StorageError, match="sop_instance_uid"):
        storage.write_report("1.2.3", sr)
    assert everything_under(tmp_path) == []


@pytest.mark.parametrize("digest", ["", "abc", "G" * 64, "A" * 64, "../" + "a" * 61])
def test_a_hash_that_is_not_a_sha256_is_refused(storage, digest):
    header, _ = received(CT[0])
    with pytest.raises(StorageError, match="^sha256: "):
        storage.instance_path(header, digest)
    with pytest.raises(StorageError, match="^sha256: "):
        storage.quarantine_path(digest, 1, NOW)


def test_the_layout(storage):
    header, instance = received(CT[0])
    assert storage.instance_path(header, instance.sha256) == (
        storage.root / "instances" / header.study_uid / header.series_uid / f"{header.sop_instance_uid}.{instance.sha256[:16]}.dcm"
    )
    assert storage.report_path("1.2.3", "1.2.3.4") == storage.root / "reports" / "1.2.3" / "1.2.3.4.dcm"
    assert (
        storage.quarantine_path(instance.sha256, 12, NOW)
        == storage.root / "quarantine" / "20261205" / f"assoc12-{instance.sha256[:16]}.dcm"
    )


# -- recorded paths -------------------------------------------------------------------------


def test_recorded_paths_outside_the_data_dir_are_refused(storage, tmp_path):
    outside = tmp_path / "elsewhere.dcm"
    outside.write_bytes(b"kept")
    for path in (outside, storage.root / ".." / "elsewhere.dcm", "/etc/passwd", storage.root.parent / "data-other" / "x.dcm"):
        with pytest.raises(StorageError, match="outside the data directory"):
            storage.recorded(path)
        with pytest.raises(StorageError, match="outside the data directory"):
            storage.read_bytes(path)
        with pytest.raises(StorageError, match="outside the data directory"):
            storage.delete(path)
        with pytest.raises(StorageError, match="outside the data directory"):
            storage.write(Path(path), b"overwritten")
    assert outside.read_bytes() == b"kept"


def test_a_relative_data_dir_reads_its_recorded_paths_either_way(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage = Storage("data")
    header, instance = received(CT[0])
    path = storage.write_instance(header, instance)
    assert not path.is_absolute()  # recorded as built: relative to the working directory, as before
    assert storage.read_bytes(str(path)) == instance.to_bytes()
    assert storage.read_bytes(str(tmp_path / path)) == instance.to_bytes()


def test_a_data_dir_reached_through_a_link_reads_paths_recorded_through_the_target(tmp_path):
    real = Storage(tmp_path / "real")
    header, instance = received(CT[0])
    path = real.write_instance(header, instance)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert Storage(tmp_path / "link").read_bytes(path) == instance.to_bytes()


# -- writes ---------------------------------------------------------------------------------


def test_an_instance_is_written_whole_and_read_back(storage):
    header, instance = received(CT[0])
    path = storage.write_instance(header, instance)
    assert storage.exists(path)
    assert storage.read_bytes(path) == CT[0].read_bytes()
    assert storage.read_dataset(path).SOPInstanceUID == header.sop_instance_uid
    assert storage.files(Area.INSTANCES) == [path]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(storage):
    header, instance = received(CT[0])
    path = storage.write_instance(header, instance)
    with pytest.raises(TypeError):
        storage.write(path, b"half of ", object())  # fails after the temporary file is open
    assert storage.read_bytes(path) == CT[0].read_bytes()
    assert storage.files(Area.INSTANCES) == [path], "no temporary file is left behind"


def test_a_report_is_written_under_its_study_with_its_hash(storage):
    sr = pydicom.dcmread(CT[1])
    stored = storage.write_report(str(sr.StudyInstanceUID), sr)
    assert stored.path == storage.report_path(str(sr.StudyInstanceUID), str(sr.SOPInstanceUID))
    data = storage.read_bytes(stored.path)
    assert stored.sha256 == hashlib.sha256(data).hexdigest() and stored.size == len(data)
    assert storage.read_dataset(str(stored.path)).SOPInstanceUID == sr.SOPInstanceUID
    storage.delete(stored.path)
    storage.delete(stored.path)  # gone already is fine
    assert storage.files(Area.REPORTS) == []


def test_quarantine_keeps_the_refused_bytes(storage):
    _, instance = received(CT[2])
    path = storage.quarantine(instance, None, NOW)
    assert path.parent == storage.quarantine_dir / "20261205" and path.name.startswith("assocNone-")
    assert storage.read_bytes(path) == CT[2].read_bytes()
    with pytest.raises(StorageError, match="^association_id: "):
        storage.quarantine_path(instance.sha256, "1/../..", NOW)


def test_free_space_against_the_reserve(tmp_path):
    free = Storage(tmp_path).free_bytes()
    assert free > 0
    assert Storage(tmp_path, min_free_bytes=0).has_room(0)
    assert not Storage(tmp_path, min_free_bytes=0).has_room(free + 10 * 1024 * MB)
    assert not Storage(tmp_path, min_free_bytes=free + 10 * 1024 * MB).has_room(0)


# -- missing files --------------------------------------------------------------------------


def test_a_missing_file_is_a_clear_error_naming_it(storage):
    gone = storage.report_path("1.2.3", "1.2.3.4")
    for read in (storage.read_bytes, storage.read_dataset, storage.existing):
        with pytest.raises(StoredFileMissing, match=f"{gone}.* is missing|is missing.*{gone}|the stored file {gone} is missing"):
            read(gone)
    with pytest.raises(FileNotFoundError):  # still what callers that catch OSError expect
        storage.read_dataset(gone)
    with pytest.raises(StoredFileMissing, match=f"the SR file {gone} is missing"):
        storage.existing(str(gone), "SR file")


def test_missing_instance_files_are_counted(storage):
    paths = [storage.write_instance(*received(f)) for f in CT]
    os.unlink(paths[1])
    with pytest.raises(StoredFileMissing, match=rf"^1 stored instance file\(s\) are missing, e\.g\. {paths[1]}$"):
        storage.existing_all(str(p) for p in paths)
    with pytest.raises(StoredFileMissing):
        storage.read_series(paths)
    (series,) = storage.read_series(paths, skip_missing=True)
    assert len(series.slices) == 2
    os.unlink(paths[0])
    os.unlink(paths[2])
    assert storage.read_series(paths, skip_missing=True) == []


def test_an_output_is_written_beside_its_report_and_names_are_checked(storage: Storage):
    stored = storage.write_output("1.2.3", "1.2.3.9", "fhir.json", b'{"resourceType": "DiagnosticReport"}')
    assert stored.path == storage.report_path("1.2.3", "1.2.3.9").with_suffix(".fhir.json")
    assert storage.read_bytes(stored.path) == b'{"resourceType": "DiagnosticReport"}'
    assert stored.sha256 == hashlib.sha256(b'{"resourceType": "DiagnosticReport"}').hexdigest() and stored.size == 36
    for suffix in ("../x", "", ".hl7", "HL7", "a/b"):
        with pytest.raises(StorageError, match="suffix"):
            storage.output_path("1.2.3", "1.2.3.9", suffix)
    with pytest.raises(StorageError, match="study_uid"):
        storage.output_path("../1", "1.2.3.9", "hl7")
