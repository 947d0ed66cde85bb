"""Copies of DICOM files under new UIDs (load tests, demos, re-sending a study as new)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid


def relabel_series(files: Iterable[Path], out_dir: Path, *, study_uid: str | None = None, series_uid: str | None = None) -> list[Path]:
    """Write copies of one series with fresh SOP Instance UIDs (and study/series UIDs).

    Pixel data and other attributes are untouched. Returns the written paths.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    written = []
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        target = out_dir / f"{i:05d}.dcm"
        ds.save_as(target, enforce_file_format=True)
        written.append(target)
    return written
