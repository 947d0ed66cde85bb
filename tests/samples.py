"""Broken DICOM on purpose: what a misbehaving sender may put on the wire."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pydicom
from pydicom.filewriter import write_file_meta_info


def _meta_bytes(ds: pydicom.Dataset) -> bytes:
    buf: Any = io.BytesIO()  # pydicom types this DicomIO; a plain buffer is what it writes to
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, ds.file_meta, enforce_standard=True)
    return buf.getvalue()


def garbage(source: Path, out: Path) -> Path:
    """Valid file meta (so an SCU will send it), then random bytes where the dataset should be."""
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    out.write_bytes(_meta_bytes(ds) + os.urandom(4096))
    return out


def truncated(source: Path, out: Path, keep_fraction: float = 0.6) -> Path:
    """The file cut short: the pixel data ends early."""
    raw = source.read_bytes()
    out.write_bytes(raw[: int(len(raw) * keep_fraction)])
    return out


def without_pixel_data(source: Path, out: Path) -> Path:
    ds = pydicom.dcmread(source)
    del ds.PixelData
    ds.save_as(out)
    return out
