"""A received instance as a DICOM Part 10 file: preamble and file meta, then the dataset as sent.

Kept as two buffers so that a 500 kB dataset is hashed and written without being copied.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info

PREAMBLE = b"\x00" * 128 + b"DICM"


@dataclass(frozen=True)
class Part10:
    header: bytes  # preamble, "DICM", encoded file meta
    dataset: memoryview  # the dataset exactly as received

    @classmethod
    def build(cls, file_meta: Dataset, dataset: bytes | memoryview) -> Part10:
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, False
        write_file_meta_info(
            buf, file_meta if isinstance(file_meta, FileMetaDataset) else FileMetaDataset(file_meta), enforce_standard=True
        )
        return cls(PREAMBLE + buf.getvalue(), memoryview(dataset))

    @property
    def chunks(self) -> tuple[bytes | memoryview, ...]:
        return (self.header, self.dataset)

    @property
    def size(self) -> int:
        return len(self.header) + self.dataset.nbytes

    @cached_property
    def sha256(self) -> str:
        digest = hashlib.sha256(self.header)
        digest.update(self.dataset)
        return digest.hexdigest()

    def to_bytes(self) -> bytes:
        return self.header + bytes(self.dataset)
