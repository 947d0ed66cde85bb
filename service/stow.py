"""STOW-RS (DICOM PS3.18 10.5) on the wire: the multipart request body, each part as an instance, the response.

No database and no files here: ``PartStream`` cuts a ``multipart/related; type="application/dicom"``
body into parts as the bytes arrive (python-multipart's parser), so each instance can be stored
while the rest is still on its way and the request size cap holds without buffering the request;
``decode_part`` turns a part into what the C-STORE handler has (the file meta the listener would
have built, the dataset bytes as sent, the validated header); ``response`` builds the PS3.18 JSON
answer. service/stow_requests.py puts them together with the ingest path.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from dicom_io.instance import (
    STATUS_CANNOT_DECODE,
    STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS,
    InstanceHeader,
    InvalidInstance,
    read_header,
)
from dicom_io.part10 import Part10
from dicom_io.sop_classes import ACCEPTED, TRANSFER_SYNTAXES

PART_TYPE = "application/dicom"
RESPONSE_TYPE = "application/dicom+json"
SUCCESS = 0x0000
MAX_PREAMBLE = 64 * 1024  # text before the first boundary that is skipped
# STOW-RS Failure Reasons of PS3.18 Table 10.5.3-2 that C-STORE has no status for (the others
# are the DIMSE statuses the listener answers: 0xA700, 0xA900, 0xC210, 0xC211, 0xC220).
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
# File meta elements whose length is a 4-byte field after 2 reserved bytes (PS3.5 7.1.2).
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


class StowError(Exception):
    """The request as a whole is refused: an HTTP status and a reason for the client and the audit trail."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def multipart_boundary(content_type: str | None) -> bytes:
    """The boundary of a ``multipart/related; type="application/dicom"`` body; 415 for anything else."""
    if not content_type:
        raise StowError(415, 'no Content-Type: send multipart/related; type="application/dicom"')
    media, params = parse_options_header(content_type)
    kind = params.get(b"type", b"").decode("latin-1").strip().lower()
    if media.decode("latin-1").lower() != "multipart/related" or kind != PART_TYPE:
        raise StowError(
            415,
            f'Content-Type {content_type[:120]!r} is not supported: send multipart/related; type="application/dicom" '
            "(DICOM Part 10 instances; metadata with bulk data is not accepted)",
        )
    boundary = params.get(b"boundary", b"")
    if not boundary:
        raise StowError(400, "the multipart Content-Type has no boundary parameter")
    return boundary


@dataclass
class Part:
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)

    @property
    def content_type(self) -> str | None:
        return self.headers.get("content-type")


class PartStream:
    """Feed the body as it arrives; get each part once its closing boundary has been read.

    Raises :class:`StowError` 413 as soon as more than ``max_bytes`` have been fed, and 400 for a
    body that is not multipart (or ends before its closing boundary).
    """

    def __init__(self, boundary: bytes, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.received = 0
        self._done: list[Part] = []
        self._current = Part()
        self._field = bytearray()
        self._value = bytearray()
        self._ended = False
        self._started = False
        self._first = b"--" + boundary
        self._head = bytearray()
        try:
            self._parser = MultipartParser(
                boundary,
                {
                    "on_part_begin": self._begin,
                    "on_part_data": self._data,
                    "on_part_end": self._end_part,
                    "on_header_field": self._header_field,
                    "on_header_value": self._header_value,
                    "on_header_end": self._header_end,
                    "on_end": self._end,
                },
            )
        except Exception as exc:  # e.g. a boundary over 70 characters
            raise StowError(400, f"bad multipart boundary: {exc}") from None

    def feed(self, chunk: bytes) -> list[Part]:
        self.received += len(chunk)
        if self.received > self.max_bytes:
            raise StowError(413, f"the request is larger than the limit of {self.max_bytes} bytes (MEDCAP_DICOMWEB_MAX_REQUEST_MB)")
        if not self._started:
            chunk = self._skip_preamble(chunk)
        if chunk and not self._ended:  # anything after the closing boundary is an epilogue, ignored
            try:
                self._parser.write(chunk)
            except MultipartParseError as exc:
                raise StowError(400, f"malformed multipart body: {exc}") from None
        done, self._done = self._done, []
        return done

    def _skip_preamble(self, chunk: bytes) -> bytes:
        """RFC 2046 allows text before the first boundary; python-multipart does not, so it is cut off here."""
        self._head += chunk
        if self._head.startswith(self._first):
            start = 0
        else:
            found = self._head.find(b"\r\n" + self._first)
            if found < 0:
                if len(self._head) > MAX_PREAMBLE:
                    raise StowError(400, f"malformed multipart body: no boundary in the first {MAX_PREAMBLE} bytes")
                return b""
            start = found + 2
        self._started = True
        rest = bytes(self._head[start:])
        self._head = bytearray()
        return rest

    def finish(self) -> list[Part]:
        done, self._done = self._done, []
        if not self._ended:
            raise StowError(400, "the multipart body ended before its closing boundary")
        return done

    # python-multipart callbacks
    def _begin(self) -> None:
        self._current = Part()

    def _data(self, data: bytes, start: int, end: int) -> None:
        self._current.body += data[start:end]

    def _end_part(self) -> None:
        self._done.append(self._current)

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._current.headers[self._field.decode("latin-1").strip().lower()] = self._value.decode("latin-1").strip()
        self._field, self._value = bytearray(), bytearray()

    def _end(self) -> None:
        self._ended = True


@dataclass(frozen=True)
class Decoded:
    """A part as the ingest path takes it: either a header to store, or the reason it is refused."""

    instance: Part10
    header: InstanceHeader | None
    error: InvalidInstance | None
    sop_class_uid: str | None = None  # as far as they could be read, for the response
    sop_instance_uid: str | None = None


def file_meta_length(data: bytes | bytearray) -> int:
    """Bytes of preamble, prefix and file meta group (explicit VR little endian) at the start of ``data``."""
    if len(data) < 132 or bytes(data[128:132]) != b"DICM":
        raise InvalidInstance(STATUS_CANNOT_DECODE, "not a DICOM Part 10 file (no 'DICM' prefix after the 128-byte preamble)")
    offset = 132
    while offset + 8 <= len(data):
        group, _element = struct.unpack_from("<HH", data, offset)
        if group != 0x0002:
            return offset
        vr = bytes(data[offset + 4 : offset + 6])
        if vr in _LONG_VRS:
            if offset + 12 > len(data):
                break
            (length,) = struct.unpack_from("<I", data, offset + 8)
            offset += 12 + length
        else:
            (length,) = struct.unpack_from("<H", data, offset + 6)
            offset += 8 + length
    if offset == len(data):
        return offset  # file meta only: the dataset is missing, and reading it says so
    raise InvalidInstance(STATUS_CANNOT_DECODE, "the file meta information is truncated")


def listener_file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> FileMetaDataset:
    """The file meta the C-STORE handler writes (pynetdicom's): the same instance, sent either way, is
    the same file with the same hash, so a re-send over the other protocol is a duplicate."""
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax_uid)
    meta.ImplementationClassUID = PYNETDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = PYNETDICOM_IMPLEMENTATION_VERSION
    return meta


def decode_part(part: Part, study_uid: str | None) -> Decoded:
    """Validate one part exactly as the listener validates a C-STORE request, plus what STOW-RS adds:
    the part's media type, the SOP class and transfer syntax (negotiated in DIMSE, checked here), and
    the study of a ``/studies/{study}`` request."""
    data = part.body
    raw = Part10(b"", memoryview(data))  # what is quarantined when the part cannot be read at all
    media = (part.content_type or PART_TYPE).split(";")[0].strip().lower()
    if media != PART_TYPE:
        return Decoded(raw, None, InvalidInstance(STATUS_CANNOT_DECODE, f"part of type {media!r}, expected {PART_TYPE}"))
    try:
        offset = file_meta_length(data)
        file_meta = pydicom.dcmread(io.BytesIO(bytes(data[:offset])), force=True).file_meta
        transfer_syntax = str(file_meta.get("TransferSyntaxUID", "") or "").strip()
    except InvalidInstance as exc:
        return Decoded(raw, None, exc)
    except Exception as exc:  # pydicom raises many types on malformed input
        return Decoded(raw, None, InvalidInstance(STATUS_CANNOT_DECODE, f"cannot read the file meta information: {exc}"))
    meta_class = str(file_meta.get("MediaStorageSOPClassUID", "") or "").strip() or None
    meta_instance = str(file_meta.get("MediaStorageSOPInstanceUID", "") or "").strip() or None
    if not transfer_syntax:
        return Decoded(
            raw, None, InvalidInstance(STATUS_CANNOT_DECODE, "the file meta has no TransferSyntaxUID"), meta_class, meta_instance
        )
    if transfer_syntax not in TRANSFER_SYNTAXES:
        error = InvalidInstance(STATUS_TRANSFER_SYNTAX_NOT_SUPPORTED, f"transfer syntax {transfer_syntax[:64]} is not supported")
        return Decoded(raw, None, error, meta_class, meta_instance)
    try:
        dataset = pydicom.dcmread(io.BytesIO(data), force=False)
    except Exception as exc:
        error = InvalidInstance(STATUS_CANNOT_DECODE, f"cannot decode dataset: {type(exc).__name__}: {exc}")
        return Decoded(raw, None, error, meta_class, meta_instance)
    sop_class = meta_class or str(dataset.get("SOPClassUID", "") or "")
    sop_instance = meta_instance or str(dataset.get("SOPInstanceUID", "") or "")
    try:
        header = read_header(dataset, transfer_syntax, sop_class_uid=sop_class, sop_instance_uid=sop_instance)
    except InvalidInstance as exc:
        return Decoded(raw, None, exc, sop_class or None, sop_instance or None)
    instance = Part10.build(listener_file_meta(header.sop_class_uid, header.sop_instance_uid, transfer_syntax), memoryview(data)[offset:])
    if header.sop_class_uid not in ACCEPTED:
        error = InvalidInstance(STATUS_SOP_CLASS_NOT_SUPPORTED, f"SOP class {header.sop_class_uid} is not accepted")
        return Decoded(instance, None, error, header.sop_class_uid, header.sop_instance_uid)
    if study_uid is not None and header.study_uid != study_uid:
        error = InvalidInstance(
            STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS, f"StudyInstanceUID {header.study_uid} is not the request's study {study_uid}"
        )
        return Decoded(instance, None, error, header.sop_class_uid, header.sop_instance_uid)
    return Decoded(instance, header, None, header.sop_class_uid, header.sop_instance_uid)


@dataclass(frozen=True)
class InstanceOutcome:
    sop_class_uid: str | None
    sop_instance_uid: str | None
    status: int  # 0x0000 stored, else the Failure Reason
    reason: str | None = None
    warning: int | None = None  # Warning Reason of a stored instance

    @property
    def stored(self) -> bool:
        return self.status == SUCCESS


def http_status(outcomes: Sequence[InstanceOutcome]) -> int:
    """PS3.18 10.5.3: 200 all stored, 409 none stored, 202 some failed or a stored one has a warning."""
    if not outcomes:
        raise StowError(400, "the request holds no instances")
    if all(o.stored and o.warning is None for o in outcomes):
        return 200
    if not any(o.stored for o in outcomes):
        return 409
    return 202


def _reference(outcome: InstanceOutcome) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = outcome.sop_class_uid or ""
    item.ReferencedSOPInstanceUID = outcome.sop_instance_uid or ""
    return item


def response(outcomes: Sequence[InstanceOutcome]) -> dict[str, Any]:
    """The Store Instances Response Module (PS3.18 Table 10.5.3-1) as DICOM JSON."""
    ds = Dataset()
    stored, failed = [], []
    for outcome in outcomes:
        item = _reference(outcome)
        if outcome.stored:
            if outcome.warning is not None:
                item.WarningReason = outcome.warning
            stored.append(item)
        else:
            item.FailureReason = outcome.status
            failed.append(item)
    ds.ReferencedSOPSequence = stored
    ds.FailedSOPSequence = failed
    return _without_empty_values(ds.to_json_dict())


def _without_empty_values(attributes: dict[str, Any]) -> dict[str, Any]:
    """PS3.18 F.2.2: an empty attribute (an empty sequence, an unknown UID) has no "Value" at all."""
    for attribute in attributes.values():
        if attribute.get("Value") == []:
            del attribute["Value"]
        elif attribute.get("vr") == "SQ":
            for item in attribute.get("Value", []):
                _without_empty_values(item)
    return attributes
