"""The few header facts MedCap needs on receipt, and the checks that decide whether to keep an instance.

This is all the listener parses: the rest of the dataset is stored as sent and read later.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.uid import UID

from dicom_io.sop_classes import IMAGE_CLASSES, is_captionable

# DIMSE C-STORE failure statuses (PS3.4 B.2.3). The 0xC2xx values are our own within the
# "cannot understand" range, one per reason, so a PACS log says what went wrong.
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STATUS_CANNOT_DECODE = 0xC210
STATUS_HANDLER_ERROR = 0xC211
STATUS_BAD_ATTRIBUTE = 0xC220

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class InvalidInstance(ValueError):
    """An instance we refuse, with the DIMSE status to answer and a reason for the audit trail."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _uid(ds: Dataset, keyword: str) -> str:
    value = str(ds.get(keyword, "") or "").strip().rstrip("\x00")
    if not value:
        raise InvalidInstance(STATUS_BAD_ATTRIBUTE, f"{keyword} is missing")
    if len(value) > 64 or not _UID.match(value):
        raise InvalidInstance(STATUS_BAD_ATTRIBUTE, f"{keyword} {value[:80]!r} is not a valid UID")
    return value


def _text(ds: Dataset, keyword: str, limit: int) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip()[:limit] or None


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class InstanceHeader:
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str
    modality: str | None
    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    series_number: int | None
    series_description: str | None

    @property
    def captionable(self) -> bool:
        return is_captionable(self.sop_class_uid)


def read_header(ds: Dataset, transfer_syntax_uid: str, *, sop_class_uid: str, sop_instance_uid: str) -> InstanceHeader:
    """Validate a received dataset against its C-STORE request and extract its header.

    ``sop_class_uid`` and ``sop_instance_uid`` are the Affected SOP Class/Instance UIDs of
    the request; the dataset must agree with them. Raises :class:`InvalidInstance`.
    """
    try:
        header = InstanceHeader(
            sop_class_uid=_uid(ds, "SOPClassUID"),
            sop_instance_uid=_uid(ds, "SOPInstanceUID"),
            study_uid=_uid(ds, "StudyInstanceUID"),
            series_uid=_uid(ds, "SeriesInstanceUID"),
            transfer_syntax_uid=transfer_syntax_uid,
            modality=_text(ds, "Modality", 16),
            patient_id=_text(ds, "PatientID", 64),
            patient_name=_text(ds, "PatientName", 324),
            accession_number=_text(ds, "AccessionNumber", 16),
            study_date=_text(ds, "StudyDate", 8),
            study_description=_text(ds, "StudyDescription", 64),
            series_number=_int(ds, "SeriesNumber"),
            series_description=_text(ds, "SeriesDescription", 64),
        )
        if header.sop_instance_uid != sop_instance_uid:
            raise InvalidInstance(
                STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS,
                f"SOPInstanceUID {header.sop_instance_uid} differs from the request's {sop_instance_uid}",
            )
        if header.sop_class_uid != sop_class_uid:
            raise InvalidInstance(
                STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS,
                f"SOPClassUID {header.sop_class_uid} differs from the request's {sop_class_uid}",
            )
        if header.sop_class_uid in IMAGE_CLASSES:
            check_pixel_data(ds, transfer_syntax_uid)
        return header
    except InvalidInstance:
        raise
    except Exception as exc:  # pydicom raises many types on malformed input
        raise InvalidInstance(STATUS_CANNOT_DECODE, f"cannot decode dataset: {type(exc).__name__}: {exc}") from exc


def check_pixel_data(ds: Dataset, transfer_syntax_uid: str) -> None:
    """Refuse image instances without pixel data, or with less native pixel data than the header promises."""
    keyword = next((k for k in _PIXEL_KEYWORDS if k in ds), None)
    if keyword is None:
        raise InvalidInstance(STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS, "image instance without pixel data")
    data = ds[keyword].value
    if not data:
        raise InvalidInstance(STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS, f"{keyword} is empty")
    if UID(transfer_syntax_uid).is_compressed:
        return  # encapsulated: lengths are only known after decoding
    expected = expected_native_length(ds)
    if expected is not None and len(data) < expected:
        raise InvalidInstance(
            STATUS_CANNOT_DECODE,
            f"{keyword} holds {len(data)} bytes but Rows/Columns/BitsAllocated/frames need {expected}: truncated",
        )


def expected_native_length(ds: Dataset) -> int | None:
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    return math.ceil(rows * cols * samples * frames * bits / 8)
