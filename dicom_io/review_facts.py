"""What the review page shows from the DICOM header: per series (modality, region, plane, contrast) and
per study (patient age and sex, priority, the clinical question).

The one place the web app reads these facts. When ``dicom_io/header_facts.py`` (the grounding work)
lands, :func:`series_facts` becomes a thin adapter over it; nothing else needs to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from pydicom.dataset import Dataset


@dataclass(frozen=True)
class SeriesFacts:
    modality: str
    body_part: str | None
    plane: str | None  # axial, coronal, sagittal, oblique (from ImageOrientationPatient)
    contrast: str | None  # ContrastBolusAgent, "none stated" when the header has no contrast attributes
    description: str | None
    slice_thickness_mm: float | None


@dataclass(frozen=True)
class StudyFacts:
    patient_age: str | None  # "54 y": PatientAge, else birth date to study date
    patient_sex: str | None  # F, M, O
    priority: str | None  # the request's priority, as written (STAT, HIGH, ROUTINE...)
    clinical_question: str | None  # reason for the requested procedure, or its description
    body_region: str | None  # BodyPartExamined of the first image


def plane_of(orientation: object) -> str | None:
    """axial / coronal / sagittal when the slice normal is within ~30° of an axis, else oblique."""
    try:
        row = [float(v) for v in orientation[:3]]  # type: ignore[index]
        col = [float(v) for v in orientation[3:6]]  # type: ignore[index]
    except (TypeError, ValueError, IndexError):
        return None
    if len(row) != 3 or len(col) != 3:
        return None
    normal = [row[1] * col[2] - row[2] * col[1], row[2] * col[0] - row[0] * col[2], row[0] * col[1] - row[1] * col[0]]
    axis = max(range(3), key=lambda i: abs(normal[i]))
    if abs(normal[axis]) < 0.866:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    text = str(value).strip() if value is not None else ""
    return text or None


def series_facts(header: Dataset) -> SeriesFacts:
    agent = _text(header, "ContrastBolusAgent")
    has_contrast_attributes = any(k in header for k in ("ContrastBolusAgent", "ContrastBolusRoute", "ContrastBolusVolume"))
    thickness = header.get("SliceThickness")
    try:
        thickness_mm = float(thickness) if thickness not in (None, "") else None
    except (TypeError, ValueError):
        thickness_mm = None
    return SeriesFacts(
        modality=_text(header, "Modality") or "?",
        body_part=_text(header, "BodyPartExamined"),
        plane=plane_of(header.get("ImageOrientationPatient")),
        contrast=agent or ("given (agent not named)" if has_contrast_attributes else None),
        description=_text(header, "SeriesDescription"),
        slice_thickness_mm=thickness_mm,
    )


def _request(header: Dataset, keyword: str) -> str | None:
    for item in header.get("RequestAttributesSequence") or []:
        found = _text(item, keyword)
        if found:
            return found
    return _text(header, keyword)


def _age(header: Dataset) -> str | None:
    age = _text(header, "PatientAge")  # "054Y", "011M", "003W", "005D"
    if age and len(age) == 4 and age[:3].isdigit() and age[3] in "DWMY":
        return f"{int(age[:3])} {dict(D='d', W='wk', M='mo', Y='y')[age[3]]}"
    born, studied = _text(header, "PatientBirthDate"), _text(header, "StudyDate")
    try:
        b = date(int(born[:4]), int(born[4:6]), int(born[6:8]))  # type: ignore[index]
        s = date(int(studied[:4]), int(studied[4:6]), int(studied[6:8]))  # type: ignore[index]
    except (TypeError, ValueError):
        return None
    years = s.year - b.year - ((s.month, s.day) < (b.month, b.day))
    return f"{years} y" if years >= 0 else None


def study_facts(header: Dataset) -> StudyFacts:
    sex = _text(header, "PatientSex")
    return StudyFacts(
        patient_age=_age(header),
        patient_sex=sex.upper() if sex else None,
        priority=_request(header, "RequestedProcedurePriority") or _text(header, "RequestPriority"),
        clinical_question=_request(header, "ReasonForTheRequestedProcedure")
        or _text(header, "ReasonForStudy")
        or _request(header, "RequestedProcedureDescription"),
        body_region=_text(header, "BodyPartExamined"),
    )
