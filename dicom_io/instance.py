"""The few header facts MedCap needs on receipt, and the checks that decide whether to keep an instance.

This is all the listener parses: the rest of the dataset is stored as sent and read later.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID

from dicom_io.sop_classes import IMAGE_CLASSES, is_captionable
from dicom_io.validation import UID_TAGS, Encoding, MalformedDataset, check_structure, inflate, validated_uid

# DIMSE C-STORE failure statuses (PS3.4 B.2.3). The 0xC2xx values are our own within the
# "cannot understand" range, one per reason, so a PACS log says what went wrong.
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STATUS_CANNOT_DECODE = 0xC210
STATUS_HANDLER_ERROR = 0xC211
STATUS_BAD_ATTRIBUTE = 0xC220

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class InvalidInstance(ValueError):
    """An instance we refuse, with the DIMSE status to answer and a reason for the audit trail."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


_RAW_UIDS = "_medcap_raw_uids"  # set by decode_received: the UIDs' bytes as sent, before pydicom trims them
_BITS_ALLOCATED = frozenset({1, 8, 16, 32, 64})


def _uid(ds: Dataset, keyword: str) -> str:
    raw: dict[str, bytes] | None = getattr(ds, _RAW_UIDS, None)
    value: bytes | str | None = raw.get(keyword) if raw is not None else (str(ds.get(keyword, "") or "") or None)
    try:
        return validated_uid(value, keyword)
    except MalformedDataset as exc:
        raise InvalidInstance(exc.status, exc.reason) from None


def decode_received(encoded: bytes | memoryview, transfer_syntax_uid: str, max_inflated_bytes: int) -> Dataset:
    """Check a received dataset's structure (dicom_io.validation), then read it with pydicom.

    Deflated data is inflated here, to at most ``max_inflated_bytes``. Raises :class:`InvalidInstance`.
    """
    encoding = Encoding.of(transfer_syntax_uid)
    try:
        data = inflate(encoded, max_inflated_bytes) if encoding.deflated else encoded
        structure = check_structure(data, encoding)
    except MalformedDataset as exc:
        raise InvalidInstance(exc.status, f"cannot decode dataset: {exc.reason}") from None
    try:
        ds = read_dataset(io.BytesIO(data), encoding.implicit_vr, encoding.little_endian)
    except Exception as exc:  # pydicom raises many types on malformed input
        raise InvalidInstance(STATUS_CANNOT_DECODE, f"cannot decode dataset: {type(exc).__name__}: {exc}") from exc
    object.__setattr__(ds, _RAW_UIDS, {UID_TAGS[tag]: value for tag, value in structure.uids.items()})
    if structure.pixel_length is not None:
        object.__setattr__(ds, "_medcap_native_pixel_length", structure.pixel_length)
    return ds


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
    if not sop_instance_uid.strip("\x00 "):
        raise InvalidInstance(STATUS_BAD_ATTRIBUTE, "the request's Affected SOP Instance UID is empty")
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
    expected = implied_native_length(ds)  # also refuses zero or impossible dimensions
    if UID(transfer_syntax_uid).is_compressed or keyword != "PixelData":
        return  # encapsulated: lengths are only known after decoding
    # Exactly what the attributes imply, plus the one pad byte an odd length needs.
    if len(data) != expected + expected % 2:
        problem = "truncated" if len(data) < expected else "longer than its attributes imply"
        raise InvalidInstance(
            STATUS_CANNOT_DECODE,
            f"{keyword} holds {len(data)} bytes but Rows/Columns/BitsAllocated/SamplesPerPixel/frames need {expected}: {problem}",
        )


def expected_native_length(ds: Dataset) -> int | None:
    """Lenient: the implied length, or None when the attributes do not say (readers of stored files)."""
    try:
        return implied_native_length(ds)
    except InvalidInstance:
        return None


def implied_native_length(ds: Dataset) -> int:
    """Bytes of native pixel data the image attributes imply; refuses missing, zero or impossible values."""
    values: dict[str, int] = {}
    for keyword, default in (("Rows", None), ("Columns", None), ("BitsAllocated", None), ("SamplesPerPixel", 1), ("NumberOfFrames", 1)):
        raw = ds.get(keyword, default)
        if raw in (None, ""):
            if default is None:
                raise InvalidInstance(STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS, f"image instance without {keyword}")
            raw = default
        try:
            values[keyword] = int(raw)
        except (TypeError, ValueError):
            raise InvalidInstance(STATUS_BAD_ATTRIBUTE, f"{keyword} {str(raw)[:40]!r} is not a number") from None
        if values[keyword] < 1:
            raise InvalidInstance(STATUS_BAD_ATTRIBUTE, f"{keyword} is {values[keyword]}: an image needs at least 1")
    if values["BitsAllocated"] not in _BITS_ALLOCATED:
        raise InvalidInstance(STATUS_BAD_ATTRIBUTE, f"BitsAllocated is {values['BitsAllocated']}: not one of 1, 8, 16, 32, 64")
    if values["SamplesPerPixel"] not in (1, 3, 4):
        raise InvalidInstance(STATUS_BAD_ATTRIBUTE, f"SamplesPerPixel is {values['SamplesPerPixel']}: not 1, 3 or 4")
    pixels = values["Rows"] * values["Columns"] * values["SamplesPerPixel"] * values["NumberOfFrames"]
    return math.ceil(pixels * values["BitsAllocated"] / 8)
