"""The data directory: where received instances, SR reports and quarantined input live on disk.

This module is the only one that builds paths under the data directory or opens files there
(``tests/service/test_storage_boundary.py`` holds every other module to that)::

    <data dir>/instances/<study>/<series>/<sop>.<sha16>.dcm   received instances
    <data dir>/reports/<study>/<sop>.dcm                       draft and verified SRs
    <data dir>/reports/<study>/<sop>.<kind suffix>             what an output kind built from that SR (HL7, FHIR)
    <data dir>/quarantine/<YYYYMMDD>/assoc<id>-<sha16>.dcm     refused input, kept for inspection

Writes are atomic (:func:`dicom_io.atomic.write_atomic`). The database records each file's
path as it was built here, ``<data dir>/...`` with the data dir as configured (relative or
absolute); reads take such a recorded path and refuse one that lies outside the data dir.
UIDs reach file names only after a check that they are DICOM UIDs (digits and dots): they come
from the network, and ``../`` in one must not write elsewhere.
"""

from __future__ import annotations

import enum
import hashlib
import io
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from pydicom import Dataset

from dicom_io.atomic import Chunk, write_atomic
from dicom_io.instance import InstanceHeader
from dicom_io.part10 import Part10

if TYPE_CHECKING:
    from dicom_io.series import Series

MB = 1024 * 1024
_SUFFIX = re.compile(r"^[a-z0-9]+(\.[a-z0-9]+)*$")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")  # PS3.5 9.1: no empty component, so never "." or ".."
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class StorageError(ValueError):
    """A name, path or value the data directory cannot take; the message says which."""


class StoredFileMissing(FileNotFoundError, StorageError):
    """A file the database records is not on disk (deleted, or the data dir is not mounted)."""


class Area(enum.StrEnum):
    """The data directory's top-level folders."""

    INSTANCES = "instances"
    REPORTS = "reports"
    QUARANTINE = "quarantine"


@dataclass(frozen=True)
class StoredReport:
    path: Path  # as recorded in the database
    sha256: str
    size: int


class Storage:
    """The data directory's layout and every read and write of the files in it."""

    __slots__ = ("root", "min_free_bytes")

    def __init__(self, root: Path | str, *, min_free_bytes: int = 0) -> None:
        if not isinstance(root, str | os.PathLike) or not str(root).strip():
            raise StorageError(f"Storage root: {root!r} is not a folder path")
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise StorageError(f"Storage root: {root} exists and is not a folder")
        if isinstance(min_free_bytes, bool) or not isinstance(min_free_bytes, int) or min_free_bytes < 0:
            raise StorageError(f"Storage min_free_bytes: {min_free_bytes!r} is not a whole number of bytes >= 0")
        self.root = root
        self.min_free_bytes = min_free_bytes

    def __repr__(self) -> str:
        return f"Storage({str(self.root)!r}, min_free_bytes={self.min_free_bytes})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Storage) and (self.root, self.min_free_bytes) == (other.root, other.min_free_bytes)

    def __hash__(self) -> int:
        return hash((self.root, self.min_free_bytes))

    # -- layout ------------------------------------------------------------------------------

    def area(self, area: Area) -> Path:
        return self.root / Area(area).value

    @property
    def instances_dir(self) -> Path:
        return self.area(Area.INSTANCES)

    @property
    def reports_dir(self) -> Path:
        return self.area(Area.REPORTS)

    @property
    def quarantine_dir(self) -> Path:
        return self.area(Area.QUARANTINE)

    def prepare(self) -> None:
        """Make the data dir and its folders (at start-up, so a missing mount fails there, not on the first C-STORE)."""
        for area in Area:
            self.area(area).mkdir(parents=True, exist_ok=True)

    def instance_path(self, header: InstanceHeader, sha256: str) -> Path:
        """Named by content hash: two payloads for one SOP Instance UID never overwrite each other,
        and a re-sent identical payload lands on the same name."""
        digest = _sha256(sha256, "sha256")
        return (
            self.instances_dir
            / _uid(header.study_uid, "study_uid")
            / _uid(header.series_uid, "series_uid")
            / f"{_uid(header.sop_instance_uid, 'sop_instance_uid')}.{digest[:16]}.dcm"
        )

    def report_path(self, study_uid: str, sop_instance_uid: str) -> Path:
        return self.reports_dir / _uid(study_uid, "study_uid") / f"{_uid(sop_instance_uid, 'sop_instance_uid')}.dcm"

    def output_path(self, study_uid: str, sop_instance_uid: str, suffix: str) -> Path:
        """An output built from a report, beside its SR: ``reports/<study>/<sop>.<suffix>``."""
        if not isinstance(suffix, str) or not _SUFFIX.match(suffix):
            raise StorageError(f"suffix: {suffix!r} is not a file suffix such as hl7 or fhir.json")
        return self.reports_dir / _uid(study_uid, "study_uid") / f"{_uid(sop_instance_uid, 'sop_instance_uid')}.{suffix}"

    def quarantine_path(self, sha256: str, association_id: int | None, now: datetime) -> Path:
        if association_id is not None and (isinstance(association_id, bool) or not isinstance(association_id, int)):
            raise StorageError(f"association_id: {association_id!r} is not an integer")
        return self.quarantine_dir / now.strftime("%Y%m%d") / f"assoc{association_id}-{_sha256(sha256, 'sha256')[:16]}.dcm"

    def recorded(self, path: str | os.PathLike[str]) -> Path:
        """A path the database recorded, checked to lie inside the data dir."""
        candidate = Path(path)
        if not self._inside(candidate):
            raise StorageError(f"recorded path {str(path)!r} is outside the data directory {self.root}")
        return candidate

    def _inside(self, path: Path) -> bool:
        root = os.path.abspath(self.root)
        if os.path.commonpath([root, os.path.abspath(path)]) == root:
            return True
        # The same folder through a symbolic link (a mount point spelt another way).
        return path.resolve().is_relative_to(self.root.resolve())

    # -- space -------------------------------------------------------------------------------

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def has_room(self, incoming_bytes: int = 0) -> bool:
        return self.free_bytes() - incoming_bytes >= self.min_free_bytes

    # -- writes ------------------------------------------------------------------------------

    def exists(self, path: Path) -> bool:
        return self.recorded(path).is_file()

    def write(self, path: Path, *chunks: Chunk) -> None:
        """Atomically: a reader sees the whole file or none of it."""
        write_atomic(self.recorded(path), *chunks)

    def write_instance(self, header: InstanceHeader, instance: Part10) -> Path:
        path = self.instance_path(header, instance.sha256)
        write_atomic(path, *instance.chunks)
        return path

    def write_report(self, study_uid: str, sr: Dataset) -> StoredReport:
        """The SR as a DICOM file under ``reports/<study>/``, named after its SOP Instance UID."""
        path = self.report_path(study_uid, str(sr.SOPInstanceUID))
        buffer = io.BytesIO()
        sr.save_as(buffer, enforce_file_format=True)
        data = buffer.getvalue()
        write_atomic(path, data)
        return StoredReport(path, hashlib.sha256(data).hexdigest(), len(data))

    def write_output(self, study_uid: str, sop_instance_uid: str, suffix: str, data: bytes) -> StoredReport:
        """An output kind's artefact for a report (see :meth:`output_path`), written atomically."""
        path = self.output_path(study_uid, sop_instance_uid, suffix)
        write_atomic(path, data)
        return StoredReport(path, hashlib.sha256(data).hexdigest(), len(data))

    def quarantine(self, instance: Part10, association_id: int | None, now: datetime) -> Path:
        """Keep refused input for inspection: nothing a peer sent is silently dropped."""
        path = self.quarantine_path(instance.sha256, association_id, now)
        write_atomic(path, *instance.chunks)
        return path

    def delete(self, path: Path | str) -> None:
        """Remove a file (gone already is fine): an SR or instance whose row did not commit."""
        self.recorded(path).unlink(missing_ok=True)

    # -- reads -------------------------------------------------------------------------------

    def existing(self, path: str | os.PathLike[str], what: str = "stored file") -> Path:
        """A recorded path that is on disk, or :class:`StoredFileMissing` naming it."""
        checked = self.recorded(path)
        if not checked.is_file():
            raise StoredFileMissing(f"the {what} {checked} is missing")
        return checked

    def existing_all(self, paths: Iterable[str | os.PathLike[str]], what: str = "stored instance file") -> list[Path]:
        """Every recorded path, or :class:`StoredFileMissing` with how many are missing and one of them."""
        checked = [self.recorded(p) for p in paths]
        missing = [p for p in checked if not p.is_file()]
        if missing:
            raise StoredFileMissing(f"{len(missing)} {what}(s) are missing, e.g. {missing[0]}")
        return checked

    def read_bytes(self, path: str | os.PathLike[str]) -> bytes:
        try:
            return self.recorded(path).read_bytes()
        except FileNotFoundError:
            raise StoredFileMissing(f"the stored file {path} is missing") from None

    def read_dataset(self, path: str | os.PathLike[str], *, stop_before_pixels: bool = False) -> Dataset:
        try:
            return pydicom.dcmread(self.recorded(path), stop_before_pixels=stop_before_pixels)
        except FileNotFoundError:
            raise StoredFileMissing(f"the stored file {path} is missing") from None

    def read_series(self, paths: Iterable[str | os.PathLike[str]], *, skip_missing: bool = False) -> list[Series]:
        """The series in these recorded instance files (headers read now, pixel data per slice later)."""
        from dicom_io.series import read_series  # numpy: not for every importer of the settings

        checked = [self.recorded(p) for p in paths]
        if skip_missing:
            checked = [p for p in checked if p.is_file()]
        else:
            self.existing_all(checked)
        return read_series(checked) if checked else []

    def files(self, area: Area) -> list[Path]:
        """Every file in one area, temporaries of unfinished writes included, in name order."""
        top = self.area(area)
        return sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else []


def _uid(value: object, field: str) -> str:
    if not isinstance(value, str) or len(value) > 64 or not _UID.match(value):
        raise StorageError(f"{field}: {str(value)[:80]!r} is not a DICOM UID (digits and dots, at most 64)")
    return value


def _sha256(value: object, field: str) -> str:
    if not isinstance(value, str) or not _SHA256.match(value):
        raise StorageError(f"{field}: {str(value)[:80]!r} is not a SHA-256 in lower-case hex")
    return value
