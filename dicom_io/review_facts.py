"""What the review page shows from the DICOM header: per series (modality, region, plane, contrast,
laterality) and per study (patient age and sex, priority, the clinical question).

The one place the web app reads these facts. The series facts are the grounding's
(:func:`dicom_io.header_facts.header_facts`, the same facts drafts are checked against), put in
the reviewer's words here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

from pydicom.dataset import Dataset

from dicom_io.header_facts import header_facts


@dataclass(frozen=True)
class SeriesFacts:
    modality: str
    body_part: str | None  # the region's term ("head"), as grounding settles it
    plane: str | None  # axial, coronal, sagittal, oblique (from ImageOrientationPatient)
    contrast: str | None  # "with (agent)", "with", "without"; None: the header does not say
    description: str | None
    slice_thickness_mm: float | None
    laterality: str | None = None  # right, left, bilateral


@dataclass(frozen=True)
class StudyFacts:
    patient_age: str | None  # "54 y": PatientAge, else birth date to study date
    patient_sex: str | None  # F, M, O
    priority: str | None  # the request's priority, as written (STAT, HIGH, ROUTINE...)
    clinical_question: str | None  # reason for the requested procedure, or its description
    body_region: str | None  # BodyPartExamined of the first image


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    text = str(value).strip() if value is not None else ""
    return text or None


def series_facts(header: Dataset, orientation: Sequence[float] | None = None) -> SeriesFacts:
    """``orientation``: the series' ImageOrientationPatient where the caller has it (multi-frame)."""
    facts = header_facts(header, orientation)
    contrast = facts.contrast
    if contrast == "with" and facts.contrast_agent:
        contrast = f"with ({facts.contrast_agent})"
    thickness = header.get("SliceThickness")
    try:
        thickness_mm = float(thickness) if thickness not in (None, "") else None
    except (TypeError, ValueError):
        thickness_mm = None
    return SeriesFacts(
        modality=facts.modality or "?",
        body_part=facts.region.term if facts.region else None,
        plane=facts.plane,
        contrast=contrast,
        description=_text(header, "SeriesDescription"),
        slice_thickness_mm=thickness_mm,
        laterality=facts.laterality,
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
