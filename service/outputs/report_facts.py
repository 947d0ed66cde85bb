"""What the RIS-facing outputs (HL7 ORU, FHIR DiagnosticReport) say about a report, read from its SR.

The SR file is the record of what was drafted or signed: patient, order (accession number),
study, the text per series, the impression, the model (ContributingEquipmentSequence) and, once
verified, who signed it and when. Only the result status needs the database: a verified report
of a study that already had one is a correction.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, date, datetime

from pydicom import Dataset
from pydicom.valuerep import DA, DT, TM
from sqlalchemy import select
from sqlalchemy.orm import object_session

from dicom_io.sr import read_findings, read_impression
from service.schema import SRDocument, SRKind
from service.storage import Storage


class ResultStatus(enum.StrEnum):
    """HL7 v2 result status (OBR-25, OBX-11); FHIR's DiagnosticReport.status beside each."""

    PRELIMINARY = "P"  # a draft: nobody has read it yet
    FINAL = "F"  # the radiologist's verified report
    CORRECTED = "C"  # a verified report replacing an earlier verified one of the same study

    @property
    def fhir(self) -> str:
        return {"P": "preliminary", "F": "final", "C": "corrected"}[self.value]


@dataclass(frozen=True)
class SeriesText:
    series_uid: str
    text: str


@dataclass(frozen=True)
class Model:
    manufacturer: str
    name: str
    version: str
    device_uid: str


@dataclass(frozen=True)
class ReportFacts:
    sop_instance_uid: str
    study_uid: str
    accession_number: str
    patient_id: str
    patient_name: str  # DICOM person name, Family^Given^...
    patient_birth_date: date | None
    patient_sex: str  # M | F | O | "" (unknown)
    study_date: date | None
    observed_at: datetime  # when the report was written (Content Date/Time), aware
    status: ResultStatus
    findings: tuple[SeriesText, ...]
    impression: str
    model: Model
    verifier_name: str | None  # DICOM person name of the approving radiologist; None for a draft
    verified_at: datetime | None

    def __post_init__(self) -> None:
        if not self.study_uid:
            raise ValueError("ReportFacts.study_uid: the SR names no study")
        if not self.findings:
            raise ValueError("ReportFacts.findings: the SR has no findings")
        if (self.verifier_name is None) != (self.status is ResultStatus.PRELIMINARY):
            raise ValueError(
                f"ReportFacts.verifier_name: a {self.status.fhir} report must {'' if self.verifier_name else 'not '}name a verifier"
            )


def result_status(report: SRDocument) -> ResultStatus:
    """P for a draft, F for a verified report, C for a verified report after an earlier verified one of its study."""
    if report.kind != SRKind.VERIFIED:
        return ResultStatus.PRELIMINARY
    session = object_session(report)
    if session is None:
        raise ValueError("result_status: the report must belong to a session (build runs in the report's transaction)")
    earlier = session.scalar(
        select(SRDocument.id)
        .where(SRDocument.study_id == report.study_id, SRDocument.kind == SRKind.VERIFIED.value, SRDocument.id < report.id)
        .limit(1)
    )
    return ResultStatus.CORRECTED if earlier is not None else ResultStatus.FINAL


def read(storage: Storage, report: SRDocument) -> ReportFacts:
    """The facts of ``report``, from its SR file (read through ``storage``)."""
    sr = storage.read_dataset(report.path)
    status = result_status(report)
    verifier: str | None = None
    verified_at: datetime | None = None
    if status is not ResultStatus.PRELIMINARY:
        observer = sr.VerifyingObserverSequence[0]
        verifier = str(observer.VerifyingObserverName)
        verified_at = _aware(DT(observer.VerificationDateTime))
    return ReportFacts(
        sop_instance_uid=str(sr.SOPInstanceUID),
        study_uid=str(sr.get("StudyInstanceUID", "")),
        accession_number=str(sr.get("AccessionNumber") or ""),
        patient_id=str(sr.get("PatientID") or ""),
        patient_name=str(sr.get("PatientName") or ""),
        patient_birth_date=_date(sr.get("PatientBirthDate")),
        patient_sex=str(sr.get("PatientSex") or ""),
        study_date=_date(sr.get("StudyDate")),
        observed_at=_content_time(sr) or verified_at or report.created_at,
        status=status,
        findings=tuple(SeriesText(f.series_uid, f.text) for f in read_findings(sr)),
        impression=read_impression(sr),
        model=_model(sr),
        verifier_name=verifier,
        verified_at=verified_at,
    )


def _model(sr: Dataset) -> Model:
    """The captioning model, from the SR's processing equipment (kept in verified SRs, whose edited items lose TID 4019)."""
    for item in sr.get("ContributingEquipmentSequence", []):
        if item.get("ManufacturerModelName") and item.get("DeviceUID"):
            versions = item.get("SoftwareVersions") or ""
            version = versions if isinstance(versions, str) else "\\".join(str(v) for v in versions)
            return Model(str(item.get("Manufacturer") or ""), str(item.ManufacturerModelName), str(version), str(item.DeviceUID))
    raise ValueError("the SR names no model in its ContributingEquipmentSequence")


def _date(value: object) -> date | None:
    if not value:
        return None
    try:
        return DA(str(value))
    except ValueError:  # a malformed date from the source study: leave it out rather than refuse the report
        return None


def _content_time(sr: Dataset) -> datetime | None:
    if not sr.get("ContentDate") or not sr.get("ContentTime"):
        return None
    try:
        day, moment = DA(str(sr.ContentDate)), TM(str(sr.ContentTime))
    except ValueError:
        return None
    return datetime.combine(day, moment).astimezone()  # written as local time without offset (dicom_io/sr.py)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
