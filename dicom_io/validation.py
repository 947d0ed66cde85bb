"""Structural checks of a received dataset before anything is kept: is it what it claims to be?

pydicom reads leniently (a length past the end is read short, implicit-VR bytes in an
explicit-VR dataset are guessed at and read anyway) and lazily (an element is parsed only when
asked for). A receiver that answers Success must know more, so this walks every element's
header in the encoding the transfer syntax names, nested sequences included, and refuses:

- an element whose declared length runs past the end of its dataset, item or sequence;
- a VR that is not one of PS3.5's (the sign of implicit-VR bytes on an explicit-VR context);
- undefined lengths where PS3.5 allows none, and unterminated sequences and items;
- deflated data that inflates past a limit.

The walk reads only headers and a handful of values (the UIDs, through :func:`validated_uid`),
so it costs microseconds per element and nothing per pixel.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

STATUS_CANNOT_DECODE = 0xC210
STATUS_BAD_ATTRIBUTE = 0xC220

UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_MAX_DEPTH = 16
_VALID_VRS = frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split())
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ UC UN UR UT SV UV".split())
_UNDEFINED_ALLOWED = frozenset({b"SQ", b"UN", b"OB", b"OW"})
# PS3.5 9.1: digits and dots, no empty component, no leading zero in a component, at most 64 chars.
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
UID_TAGS = {0x00080016: "SOPClassUID", 0x00080018: "SOPInstanceUID", 0x0020000D: "StudyInstanceUID", 0x0020000E: "SeriesInstanceUID"}


class MalformedDataset(ValueError):
    """The dataset's bytes do not hold together; ``status`` is the DIMSE failure to answer."""

    def __init__(self, reason: str, status: int = STATUS_CANNOT_DECODE) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class Encoding:
    implicit_vr: bool
    little_endian: bool
    deflated: bool

    @classmethod
    def of(cls, transfer_syntax_uid: str) -> Encoding:
        if transfer_syntax_uid == ImplicitVRLittleEndian:
            return cls(True, True, False)
        if transfer_syntax_uid == ExplicitVRBigEndian:
            return cls(False, False, False)
        return cls(False, True, transfer_syntax_uid == DeflatedExplicitVRLittleEndian)


def inflate(data: bytes | memoryview, limit: int) -> bytes:
    """Raw-deflate ``data`` to at most ``limit`` bytes, or refuse: a small message must not become a large one."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise MalformedDataset(f"deflated dataset does not inflate: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise MalformedDataset(f"deflated dataset inflates past the limit of {limit} bytes (MEDCAP_MAX_INFLATED_MB)")
    return out


def validated_uid(raw: bytes | str | None, keyword: str) -> str:
    """A UID exactly as PS3.5 spells it: one trailing NUL (or space) pad allowed, nothing else."""
    if raw is None:
        raise MalformedDataset(f"{keyword} is missing", STATUS_BAD_ATTRIBUTE)
    text = raw.decode("latin-1") if isinstance(raw, bytes | bytearray | memoryview) else str(raw)
    if text[-1:] in ("\x00", " "):
        text = text[:-1]
    if not text:
        raise MalformedDataset(f"{keyword} is missing", STATUS_BAD_ATTRIBUTE)
    if len(text) > 64 or not _UID.fullmatch(text):
        raise MalformedDataset(f"{keyword} {text[:80]!r} is not a valid UID", STATUS_BAD_ATTRIBUTE)
    return text


class _Walker:
    def __init__(self, data: bytes | memoryview, encoding: Encoding) -> None:
        self.data = memoryview(data)
        self.implicit = encoding.implicit_vr
        self.prefix = "<" if encoding.little_endian else ">"
        self.uids: dict[int, bytes] = {}
        self.pixel_length: int | None = None  # native PixelData's length; None if absent or encapsulated

    def _tag(self, pos: int) -> int:
        group, element = struct.unpack_from(self.prefix + "HH", self.data, pos)
        return int((group << 16) | element)

    def dataset(self, pos: int, end: int, depth: int, in_item: bool) -> int:
        """Walk elements from ``pos``; stop at ``end`` or (undefined-length item) at its delimiter."""
        data = self.data
        while pos < end:
            if end - pos < 8:
                raise MalformedDataset(f"{end - pos} stray bytes at offset {pos} where an element should start")
            tag = self._tag(pos)
            if tag == _ITEM_END:
                if not in_item:
                    raise MalformedDataset(f"item delimiter outside an item at offset {pos}")
                return pos + 8
            if tag in (_ITEM, _SEQUENCE_END):
                raise MalformedDataset(f"item tag ({tag >> 16:04X},{tag & 0xFFFF:04X}) where an element should be, offset {pos}")
            if self.implicit:
                (length,) = struct.unpack_from(self.prefix + "L", data, pos + 4)
                vr = _implicit_vr(tag, length)
                header = 8
            else:
                vr = bytes(data[pos + 4 : pos + 6])
                if vr not in _VALID_VRS:
                    raise MalformedDataset(
                        f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) at offset {pos} has no valid VR ({vr!r}): "
                        "not encoded as its transfer syntax says (implicit VR on an explicit-VR context?)"
                    )
                if vr in _LONG_VRS:
                    if end - pos < 12:
                        raise MalformedDataset(f"element header cut short at offset {pos}")
                    (length,) = struct.unpack_from(self.prefix + "L", data, pos + 8)
                    header = 12
                else:
                    (length,) = struct.unpack_from(self.prefix + "H", data, pos + 6)
                    header = 8
            start = pos + header
            if length == UNDEFINED:
                if vr not in _UNDEFINED_ALLOWED:
                    raise MalformedDataset(
                        f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) has an undefined length its VR {vr!r} does not allow"
                    )
                implicit, self.implicit = self.implicit, self.implicit or vr == b"UN"  # PS3.5 6.2.2: UN items are implicit VR
                try:
                    pos = self.sequence(start, end, depth + 1, undefined=True, fragments=tag == _PIXEL_DATA)
                finally:
                    self.implicit = implicit
                continue
            if start + length > end:
                raise MalformedDataset(
                    f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) declares {length} bytes but only {max(end - start, 0)} remain: truncated"
                )
            if vr == b"SQ" or (vr == b"UN" and self.implicit and dictionary_vr(tag) == "SQ"):
                self.sequence(start, start + length, depth + 1, undefined=False, fragments=False)
            elif depth == 0:
                if tag in UID_TAGS:
                    self.uids[tag] = bytes(data[start : start + length])
                elif tag == _PIXEL_DATA:
                    self.pixel_length = length
            pos = start + length
        if in_item:
            raise MalformedDataset("item of undefined length has no delimiter before the end of its data")
        return pos

    def sequence(self, pos: int, end: int, depth: int, *, undefined: bool, fragments: bool) -> int:
        """Walk a sequence's items (or encapsulated pixel data's fragments); return where it ends."""
        if depth > _MAX_DEPTH:
            raise MalformedDataset(f"sequences nested deeper than {_MAX_DEPTH}")
        while pos < end:
            if end - pos < 8:
                raise MalformedDataset(f"sequence item header cut short at offset {pos}")
            tag = self._tag(pos)
            (length,) = struct.unpack_from(self.prefix + "L", self.data, pos + 4)
            if tag == _SEQUENCE_END:
                if not undefined:
                    raise MalformedDataset(f"sequence delimiter in a sequence of defined length at offset {pos}")
                return pos + 8
            if tag != _ITEM:
                raise MalformedDataset(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) inside a sequence where an item should be, offset {pos}")
            start = pos + 8
            if length == UNDEFINED:
                if fragments:
                    raise MalformedDataset("encapsulated pixel data fragment of undefined length")
                pos = self.dataset(start, end, depth, in_item=True)
                continue
            if start + length > end:
                raise MalformedDataset(f"sequence item declares {length} bytes but only {max(end - start, 0)} remain")
            if not fragments:
                self.dataset(start, start + length, depth, in_item=False)
            pos = start + length
        if undefined:
            raise MalformedDataset("sequence of undefined length has no delimiter before the end of the data")
        return pos


def dictionary_vr(tag: int) -> str | None:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


def _implicit_vr(tag: int, length: int) -> bytes:
    if tag == _PIXEL_DATA:
        return b"OB" if length == UNDEFINED else b"OW"
    vr = dictionary_vr(tag)
    if vr is None:
        return b"UN" if length == UNDEFINED else b"LO"  # private/unknown: only its length matters here
    if vr == "SQ":
        return b"SQ"
    if length == UNDEFINED:
        return b"UN"
    return b"OB"


@dataclass(frozen=True)
class DatasetStructure:
    """What the walk learned: the raw header UIDs (validated later) and native pixel data's length."""

    uids: dict[int, bytes]
    pixel_length: int | None


def check_structure(data: bytes | memoryview, encoding: Encoding) -> DatasetStructure:
    """Walk every element header of an encoded dataset; raise :class:`MalformedDataset` if it does not hold together."""
    walker = _Walker(data, encoding)
    try:
        walker.dataset(0, len(walker.data), 0, in_item=False)
    except struct.error as exc:
        raise MalformedDataset(f"element header cut short: {exc}") from None
    return DatasetStructure(walker.uids, walker.pixel_length)
