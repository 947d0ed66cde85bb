"""A sample patient for a first run: a synthetic head CT and brain MR, generated here (no patient, no licence).

`medcap sample DIR` writes them, so that the README's first run works from a fresh clone: send
them with storescu and the pipeline drafts, the review page shows the stack. The images are
geometric phantoms in realistic units (HU for the CT: scalp, skull, brain, ventricles and a small
hyperdense focus; T1-like signal for the MR), with request attributes that fill the worklist's
columns. UIDs are derived from fixed names, so sending the sample twice stores it once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4")
PATIENT_ID = "MEDCAP-SAMPLE"


@dataclass(frozen=True)
class SampleSeries:
    name: str  # the folder under the sample directory
    modality: str
    study: str
    description: str
    slices: int
    size: int


SERIES = (
    SampleSeries("ct-head", "CT", "ct", "CT HEAD WITHOUT CONTRAST (synthetic phantom)", 24, 256),
    SampleSeries("mr-brain", "MR", "mr", "MR BRAIN T1 (synthetic phantom)", 20, 256),
)


def _uid(*parts: object) -> UID:
    return generate_uid(entropy_srcs=["medcap-sample", *map(str, parts)])


def _ellipse(size: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    inside: np.ndarray = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0
    return inside


def phantom(modality: str, size: int, slices: int, k: int) -> np.ndarray:
    """Slice ``k`` of ``slices``: a head whose size follows the skull's curve from vertex to base."""
    t = (k + 0.5) / slices  # 0 at the base, 1 at the vertex
    scale = float(np.sqrt(max(0.05, 1 - (2 * t - 0.9) ** 2)))
    outer = _ellipse(size, 0.5, 0.5, 0.40 * scale, 0.46 * scale)
    skull = _ellipse(size, 0.5, 0.5, 0.38 * scale, 0.44 * scale)
    brain = _ellipse(size, 0.5, 0.5, 0.35 * scale, 0.41 * scale)
    ventricles = (_ellipse(size, 0.45, 0.47, 0.03, 0.10) | _ellipse(size, 0.55, 0.47, 0.03, 0.10)) if 0.4 < t < 0.7 else None
    grey = brain & ~_ellipse(size, 0.5, 0.5, 0.29 * scale, 0.35 * scale)
    rng = np.random.default_rng(k)
    if modality == "CT":
        image = np.full((size, size), -1000.0, dtype=np.float32)  # air
        image[outer] = 20.0  # scalp
        image[skull] = 1100.0  # bone
        image[brain] = 32.0  # white matter
        image[grey] = 40.0  # grey matter
        if ventricles is not None:
            image[brain & ventricles] = 6.0  # CSF
        if 0.55 < t < 0.7:  # a small hyperdense focus in the right frontal lobe, as a finding to look for
            image[_ellipse(size, 0.38, 0.33, 0.035, 0.03)] = 68.0
        image += rng.normal(0, 4, image.shape).astype(np.float32) * (image > -900)
        return image
    image = np.zeros((size, size), dtype=np.float32)
    image[outer] = 900.0  # scalp fat, bright on T1
    image[skull] = 80.0  # cortical bone, dark
    image[brain] = 620.0  # white matter
    image[grey] = 450.0
    if ventricles is not None:
        image[brain & ventricles] = 150.0
    image += rng.normal(0, 12, image.shape).astype(np.float32) * (image > 0)
    return image


def _dataset(series: SampleSeries, k: int, pixels: np.ndarray) -> Dataset:
    sop_class = CT_IMAGE_STORAGE if series.modality == "CT" else MR_IMAGE_STORAGE
    sop_uid = _uid(series.name, k)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.StudyInstanceUID = _uid("study", series.study)
    ds.SeriesInstanceUID = _uid("series", series.name)
    ds.FrameOfReferenceUID = _uid("frame", series.study)
    ds.PatientName, ds.PatientID, ds.PatientSex, ds.PatientBirthDate = "Sample^Phantom", PATIENT_ID, "O", "19700101"
    ds.StudyDate = "20260102" if series.study == "ct" else "20251015"
    ds.SeriesDate = ds.ContentDate = ds.StudyDate
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "093000"
    ds.AccessionNumber = f"SAMPLE-{series.modality}"
    ds.StudyID = "1"
    ds.StudyDescription = series.description
    ds.SeriesDescription = f"{series.modality} axial 5 mm (synthetic)"
    ds.Modality = series.modality
    ds.ReferringPhysicianName = ""
    ds.PatientPosition = "HFS"
    ds.PositionReferenceIndicator = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.AcquisitionNumber = 1
    ds.Manufacturer = "MedCap synthetic sample"
    ds.BodyPartExamined = "HEAD"
    ds.SeriesNumber, ds.InstanceNumber = 2 if series.modality == "CT" else 3, k + 1
    request = Dataset()
    request.RequestedProcedureDescription = series.description
    request.ReasonForTheRequestedProcedure = "Sudden severe headache; rule out haemorrhage" if series.modality == "CT" else "Headaches"
    request.RequestedProcedurePriority = "STAT" if series.modality == "CT" else "ROUTINE"
    ds.RequestAttributesSequence = [request]
    spacing = 0.9
    ds.PixelSpacing = [spacing, spacing]
    ds.SliceThickness = 5.0
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-spacing * series.size / 2, -spacing * series.size / 2, -60.0 + 5.0 * k]
    ds.SliceLocation = -60.0 + 5.0 * k
    ds.Rows = ds.Columns = series.size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if series.modality == "CT":
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.KVP = 120
        ds.WindowCenter, ds.WindowWidth = 40, 80
        stored = np.clip(np.rint(pixels + 1024), 0, 65535).astype(np.uint16)
    else:
        ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = "SE", "NONE", "2D"
        ds.RepetitionTime, ds.EchoTime, ds.MagneticFieldStrength = 500, 12, 1.5
        ds.ScanOptions, ds.EchoTrainLength = "", 1
        stored = np.clip(np.rint(pixels), 0, 65535).astype(np.uint16)
    ds.PixelData = stored.tobytes()
    return ds


def write_sample(directory: Path) -> dict[str, list[Path]]:
    """Write the sample's series under ``directory`` (one folder each); returns their files."""
    written: dict[str, list[Path]] = {}
    for series in SERIES:
        folder = directory / series.name
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for k in range(series.slices):
            path = folder / f"{k + 1:03d}.dcm"
            _dataset(series, k, phantom(series.modality, series.size, series.slices, k)).save_as(path, enforce_file_format=True)
            files.append(path)
        written[series.name] = files
    return written
