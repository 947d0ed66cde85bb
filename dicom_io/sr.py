"""The DICOM Structured Reports MedCap writes: an AI draft, and the radiologist-verified report that replaces it.

Both are Comprehensive SR documents shaped like TID 2000 "Basic Diagnostic Imaging Report"::

    CONTAINER (LN 18748-4 "Diagnostic Imaging Report")              [TID 2000, SEPARATE]
      HAS CONCEPT MOD  CODE (DCM 121049 Language …) = en-US         [TID 1204]
      HAS OBS CONTEXT  Device observer: UID, name, manufacturer, model  [TID 1001/1004]
      HAS OBS CONTEXT  Person observer (verified report only)       [TID 1003]
      HAS CONCEPT MOD  CODE (DCM 121058 "Procedure reported") per modality, from the header  [TID 2000]
      CONTAINS CONTAINER (LN 59776-5 "Findings")                    [TID 2001/2002]
        CONTAINS TEXT (DCM 121071 "Finding") = one captioned series
          INFERRED FROM IMAGE (DCM 121080 "Best illustration of finding") per key slice
          HAS CONCEPT MOD  CODE (SCT 363698007 "Finding site") = the header's body region (CID 4031)
            HAS CONCEPT MOD  CODE (SCT 272741003 "Laterality") = the header's laterality
          HAS CONCEPT MOD  TID 4019 algorithm name, version, parameters, manufacturer
      CONTAINS CONTAINER (LN 19005-8 "Impressions")
        CONTAINS TEXT (DCM 121073 "Impression")
          HAS CONCEPT MOD  TID 4019 …

The model's identity is also in the SOP Common ContributingEquipmentSequence (IHE AI Results), whose
DeviceUID is derived from the weights' SHA-256 so that it changes whenever the weights do.
"""

from __future__ import annotations

import re
import uuid
import warnings
from collections.abc import Iterable, Sequence
from copy import deepcopy
from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
from pydicom import Dataset
from pydicom.charset import convert_encodings
from pydicom.sr.codedict import codes
from pydicom.valuerep import DT

from dicom_io.header_facts import Code

DRAFT_SERIES_DESCRIPTION = "MedCap AI draft - preliminary, not verified"
VERIFIED_SERIES_DESCRIPTION = "MedCap report - verified"
SR_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR: every report MedCap writes
DRAFT_SERIES_NUMBER = 9000
VERIFIED_SERIES_NUMBER = 9001

REPORT_TITLE = hd.sr.CodedConcept("18748-4", "LN", "Diagnostic Imaging Report")  # CID 7000
FINDINGS = hd.sr.CodedConcept("59776-5", "LN", "Findings")  # CID 7001, LOINC preferred over retired DCM 121070
IMPRESSIONS = hd.sr.CodedConcept("19005-8", "LN", "Impressions")  # CID 7001, over retired DCM 121072
FINDING = hd.sr.CodedConcept.from_code(codes.DCM.Finding)  # 121071, CID 7002
IMPRESSION = hd.sr.CodedConcept.from_code(codes.DCM.Impression)  # 121073, CID 7002
KEY_IMAGE = hd.sr.CodedConcept.from_code(codes.DCM.BestIllustrationOfFinding)  # 121080, CID 7003 purposes of reference
ENGLISH = hd.sr.CodedConcept("en-US", "RFC5646", "English (United States)")
# CID 7005: the model made a new instance from the images. 109103 "Modifying Equipment" means changing an
# existing instance without making a new one; IHE AIR's (Newcode1, 99IHE, "Processing Algorithm") is a
# placeholder that validators do not know, and highdicom accepts only CID 7005 codes.
PURPOSE_PROCESSING = codes.DCM.ProcessingEquipment  # 109102
PROCEDURE_REPORTED = hd.sr.CodedConcept.from_code(codes.DCM.ProcedureReported)  # 121058
FINDING_SITE = hd.sr.CodedConcept.from_code(codes.SCT.FindingSite)  # 363698007
LATERALITY = hd.sr.CodedConcept.from_code(codes.SCT.Laterality)  # 272741003

# A fixed namespace so that the same weights always give the same DeviceUID, on any machine.
_DEVICE_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:medcap:model-weights")
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _check_uid(value: object, where: str) -> str:
    if not isinstance(value, str) or len(value) > 64 or not _UID.match(value):
        raise ValueError(f"{where} must be a DICOM UID, got {value!r}")
    return value


def _check_text(value: object, where: str, limit: int | None = None) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where} must be non-empty text, got {value!r}")
    if limit is not None and len(value) > limit:
        raise ValueError(f"{where} must be at most {limit} characters, got {len(value)}")
    return value


def _check_aware(value: object, where: str) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ValueError(f"{where} must be a timezone-aware datetime, got {value!r}")
    return value


@dataclass(frozen=True)
class ImageRef:
    """One key slice: an image instance, and the 1-based frame for multi-frame instances."""

    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None = None

    def __post_init__(self) -> None:
        _check_uid(self.sop_class_uid, "ImageRef.sop_class_uid")
        _check_uid(self.sop_instance_uid, "ImageRef.sop_instance_uid")
        frame = self.frame_number
        if frame is not None and (isinstance(frame, bool) or not isinstance(frame, int) or frame < 1):
            raise ValueError(f"ImageRef.frame_number must be None or an integer >= 1, got {frame!r}")

    @classmethod
    def of(cls, ref: ImageRef | Dataset | tuple[str, str] | tuple[str, str, int | None]) -> ImageRef:
        """From a source dataset, a ``(sop_class_uid, sop_instance_uid[, frame])`` tuple, or an ImageRef."""
        if isinstance(ref, ImageRef):
            return ref
        if isinstance(ref, Dataset):
            return cls(str(ref.get("SOPClassUID", "")), str(ref.get("SOPInstanceUID", "")))
        if isinstance(ref, tuple) and len(ref) in (2, 3):
            return cls(*ref)
        raise ValueError(f"a key image must be a Dataset, a (sop_class_uid, sop_instance_uid) tuple or an ImageRef, got {ref!r}")


KeyImage = ImageRef | Dataset | tuple[str, str] | tuple[str, str, int | None]


@dataclass(frozen=True, init=False)
class SeriesFinding:
    """The caption of one series and the key slices it was drawn from (normalised to ImageRefs)."""

    series_uid: str
    text: str
    key_images: tuple[ImageRef, ...]
    finding_site: Code | None  # the series' body region from its header (dicom_io/header_facts.py), coded
    laterality: Code | None  # from the header too; only with a finding site, which it qualifies

    def __init__(
        self,
        series_uid: str,
        text: str,
        key_images: Iterable[KeyImage],
        *,
        finding_site: Code | None = None,
        laterality: Code | None = None,
    ) -> None:
        _check_uid(series_uid, "SeriesFinding.series_uid")
        _check_text(text, "SeriesFinding.text")
        for name, code in (("finding_site", finding_site), ("laterality", laterality)):
            if code is not None and not isinstance(code, Code):
                raise ValueError(f"SeriesFinding.{name} must be a Code or None, got {code!r}")
        if laterality is not None and finding_site is None:
            raise ValueError("SeriesFinding.laterality qualifies a finding site: give finding_site too")
        refs = []
        for i, ref in enumerate(key_images):
            try:
                refs.append(ImageRef.of(ref))
            except ValueError as exc:
                raise ValueError(f"SeriesFinding.key_images[{i}]: {exc}") from exc
        if not refs:
            raise ValueError("SeriesFinding.key_images is empty: a finding must cite at least one key slice")
        if len(set(refs)) != len(refs):
            raise ValueError("SeriesFinding.key_images holds the same image twice")
        object.__setattr__(self, "series_uid", series_uid)
        object.__setattr__(self, "text", text)
        object.__setattr__(self, "key_images", tuple(refs))
        object.__setattr__(self, "finding_site", finding_site)
        object.__setattr__(self, "laterality", laterality)

    def with_text(self, text: str) -> SeriesFinding:
        """The same series, key images and header codes with another text (a radiologist's edit)."""
        return SeriesFinding(self.series_uid, text, self.key_images, finding_site=self.finding_site, laterality=self.laterality)


@dataclass(frozen=True)
class AlgorithmInfo:
    """The captioning model, as recorded in the SR (TID 1004, TID 4019 and ContributingEquipmentSequence)."""

    name: str
    version: str
    weights_sha256: str
    generation_preset: str
    manufacturer: str = "MedCap"

    def __post_init__(self) -> None:
        # 64 characters: these become LO values (ManufacturerModelName, SoftwareVersions, Manufacturer)
        _check_text(self.name, "AlgorithmInfo.name", 64)
        _check_text(self.version, "AlgorithmInfo.version", 64)
        _check_text(self.manufacturer, "AlgorithmInfo.manufacturer", 64)
        _check_text(self.generation_preset, "AlgorithmInfo.generation_preset")
        if not isinstance(self.weights_sha256, str) or not _SHA256.match(self.weights_sha256.lower()):
            raise ValueError(f"AlgorithmInfo.weights_sha256 must be 64 hex digits, got {self.weights_sha256!r}")
        object.__setattr__(self, "weights_sha256", self.weights_sha256.lower())

    @property
    def device_uid(self) -> str:
        """A UID for this model that changes whenever the weights do (2.25 + a name-based UUID)."""
        return device_uid(self.weights_sha256)

    @property
    def parameters(self) -> tuple[str, ...]:
        return (f"weights_sha256={self.weights_sha256}", f"generation_preset={self.generation_preset}")


def device_uid(weights_sha256: str) -> str:
    return f"2.25.{uuid.uuid5(_DEVICE_NAMESPACE, weights_sha256.lower()).int}"


@dataclass(frozen=True)
class SupersededDraft:
    """The earlier draft SR of the same study that a draft of a later study version replaces."""

    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    study_version: int  # the study version the earlier draft was made from

    def __post_init__(self) -> None:
        for name in ("study_uid", "series_uid", "sop_class_uid", "sop_instance_uid"):
            _check_uid(getattr(self, name), f"SupersededDraft.{name}")
        version = self.study_version
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"SupersededDraft.study_version must be an integer >= 1, got {version!r}")

    @property
    def sentence(self) -> str:
        """What the new draft's text says of it, so that a reader of the PACS knows which draft is current."""
        # worded to stay true in the verified report made from this draft unchanged
        return (
            f"Supersedes the AI draft of study version {self.study_version} (SR {self.sop_instance_uid}), made before later images arrived."
        )

    def as_dataset(self) -> Dataset:
        """The reference highdicom turns into a Predecessor Documents Sequence item."""
        ds = Dataset()
        ds.StudyInstanceUID = self.study_uid
        ds.SeriesInstanceUID = self.series_uid
        ds.SOPClassUID = self.sop_class_uid
        ds.SOPInstanceUID = self.sop_instance_uid
        return ds


@dataclass(frozen=True)
class Verification:
    """Who verified the report, for whom, and when."""

    verifier_name: str  # DICOM person name, "Family^Given"
    verifier_organization: str
    verified_at: datetime

    def __post_init__(self) -> None:
        _check_text(self.verifier_name, "Verification.verifier_name", 64 * 5)
        if "^" not in self.verifier_name:
            # without a caret "Jane Smith" would be read as a family name of "Jane Smith"
            raise ValueError(f"Verification.verifier_name must be a DICOM person name 'Family^Given', got {self.verifier_name!r}")
        _check_text(self.verifier_organization, "Verification.verifier_organization", 64)
        _check_aware(self.verified_at, "Verification.verified_at")


# -- writing -------------------------------------------------------------------------------


def write_draft_sr(
    findings: Sequence[SeriesFinding],
    impression: str,
    algorithm: AlgorithmInfo,
    evidence: Sequence[Dataset],
    *,
    series_instance_uid: str | None = None,
    series_number: int = DRAFT_SERIES_NUMBER,
    instance_number: int = 1,
    created_at: datetime | None = None,
    procedures: Sequence[Code] = (),
    supersedes: SupersededDraft | None = None,
) -> hd.sr.ComprehensiveSR:
    """The AI draft: PARTIAL / UNVERIFIED / PRELIMINARY, in a new series of the evidence's study.

    ``evidence`` is every source instance the report rests on (headers suffice); each key image
    must be one of them, and in the series its finding names. ``procedures``: "Procedure reported",
    coded from the header (``dicom_io.header_facts.procedure_code``). ``supersedes``: the draft of
    an earlier version of the study this one replaces; it becomes the Predecessor Documents
    Sequence, and the impression starts by saying which version is superseded.
    """
    procedures = _check_codes(procedures, "procedures")
    findings = _check_findings(findings, "findings")
    _check_text(impression, "impression")
    if not isinstance(algorithm, AlgorithmInfo):
        raise ValueError(f"algorithm must be an AlgorithmInfo, got {type(algorithm).__name__}")
    evidence = _check_evidence(evidence, findings)
    if supersedes is not None:
        if not isinstance(supersedes, SupersededDraft):
            raise ValueError(f"supersedes must be a SupersededDraft or None, got {type(supersedes).__name__}")
        if supersedes.study_uid != str(evidence[0].StudyInstanceUID):
            raise ValueError(f"supersedes.study_uid: the earlier draft is of study {supersedes.study_uid}, not the evidence's")
        impression = f"{supersedes.sentence} {impression}"
    if created_at is not None:
        _check_aware(created_at, "created_at")
    content = _content_tree(findings, impression, algorithm, verifier=None, unchanged=None, procedures=procedures)
    texts = [f.text for f in findings] + [impression, DRAFT_SERIES_DESCRIPTION, algorithm.name, algorithm.manufacturer]
    texts += [c.meaning for f in findings for c in (f.finding_site, f.laterality) if c is not None] + [c.meaning for c in procedures]
    sr = _build(
        evidence,
        content,
        series_instance_uid,
        series_number,
        instance_number,
        created_at,
        charset=_charset(evidence[0], texts),
        verification=None,
        previous=supersedes.as_dataset() if supersedes is not None else None,
    )
    equipment = hd.ContributingEquipment(
        manufacturer=algorithm.manufacturer,
        purpose_of_reference=PURPOSE_PROCESSING,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        contribution_datetime=(created_at or datetime.now().astimezone()),
        contribution_description=f"Draft report text; weights sha256 {algorithm.weights_sha256}; preset {algorithm.generation_preset}"[
            :1024
        ],
    )
    equipment.DeviceUID = algorithm.device_uid
    sr.ContributingEquipmentSequence.append(equipment)
    sr.SeriesDescription = DRAFT_SERIES_DESCRIPTION
    return sr


def write_verified_sr(
    draft: Dataset,
    verification: Verification,
    *,
    findings: Sequence[SeriesFinding] | None = None,
    impression: str | None = None,
    series_instance_uid: str | None = None,
    series_number: int = VERIFIED_SERIES_NUMBER,
    instance_number: int = 1,
) -> hd.sr.ComprehensiveSR:
    """The radiologist's report: COMPLETE / VERIFIED / FINAL, a new instance whose predecessor is ``draft``.

    ``findings`` and ``impression`` are the final texts (default: the draft's). Key images must be
    among the draft's evidence. Items the radiologist left unchanged keep the algorithm's TID 4019
    identification; edited ones lose it, since their text is no longer the model's output.
    """
    if not isinstance(verification, Verification):
        raise ValueError(f"verification must be a Verification, got {type(verification).__name__}")
    if draft.get("VerificationFlag") != "UNVERIFIED":
        raise ValueError(f"draft must be an unverified SR, its VerificationFlag is {draft.get('VerificationFlag')!r}")
    algorithm = read_algorithm(draft)
    draft_findings = read_findings(draft)
    draft_impression = read_impression(draft)
    findings = draft_findings if findings is None else _check_findings(findings, "findings")
    # The header's codes are no model output and no radiologist's text: an edited finding keeps its draft's.
    coded = {f.series_uid: f for f in draft_findings}
    findings = [f if f.finding_site is not None or f.series_uid not in coded else coded[f.series_uid].with_text(f.text) for f in findings]
    impression = draft_impression if impression is None else _check_text(impression, "impression")
    evidence = _check_evidence(_evidence_of(draft), findings)
    unchanged: set[tuple[str | None, str]] = {(f.series_uid, f.text) for f in draft_findings} | {(None, draft_impression)}
    content = _content_tree(findings, impression, algorithm, verifier=verification, unchanged=unchanged, procedures=read_procedures(draft))
    texts = [f.text for f in findings] + [
        impression,
        VERIFIED_SERIES_DESCRIPTION,
        verification.verifier_name,
        verification.verifier_organization,
    ]
    sr = _build(
        evidence,
        content,
        series_instance_uid,
        series_number,
        instance_number,
        verification.verified_at,
        charset=_charset(draft, texts),
        verification=verification,
        previous=draft,
    )
    # the evidence above are stand-ins made from the draft: take patient, study and equipment from the draft itself
    sr.copy_patient_and_study_information(draft)
    sr.ContributingEquipmentSequence = deepcopy(draft.ContributingEquipmentSequence)
    sr.SeriesDescription = VERIFIED_SERIES_DESCRIPTION
    return sr


def _build(
    evidence: Sequence[Dataset],
    content: hd.sr.ContainerContentItem,
    series_instance_uid: str | None,
    series_number: int,
    instance_number: int,
    at: datetime | None,
    *,
    charset: str | list[str] | None,
    verification: Verification | None,
    previous: Dataset | None,
) -> hd.sr.ComprehensiveSR:
    evidence = [_with_type2(evidence[0]), *evidence[1:]]
    local = at.astimezone() if at is not None else None  # Content Date/Time carry no offset: local time, as the header's others
    with warnings.catch_warnings():
        # highdicom warns about the source's caret-less (often de-identified) patient name, which we copy as is
        warnings.filterwarnings("ignore", message=".*person name.*", category=UserWarning)
        sr = hd.sr.ComprehensiveSR(
            evidence=evidence,
            content=content,
            series_instance_uid=_check_uid(series_instance_uid, "series_instance_uid") if series_instance_uid else hd.UID(),
            series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=instance_number,
            manufacturer="MedCap",
            is_complete=verification is not None,  # highdicom does not tie "verified" to "complete": we do
            is_final=verification is not None,
            is_verified=verification is not None,
            verifying_observer_name=verification.verifier_name if verification else None,
            verifying_organization=verification.verifier_organization if verification else None,
            previous_versions=[previous] if previous is not None else None,
            specific_character_set=charset,
            content_date=local.date() if local else None,
            content_time=local.time() if local else None,
        )
    _repair_copied(sr)
    if verification is not None:
        sr.VerifyingObserverSequence[0].VerificationDateTime = DT(verification.verified_at)  # highdicom stamps "now"
    return sr


# Type 2 patient/study attributes highdicom reads from the first evidence instance without a default
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate", "StudyTime")


def _with_type2(source: Dataset) -> Dataset:
    """A header-only copy of ``source`` (the caller's dataset stays untouched) with missing Type 2 attributes empty."""
    header = Dataset()
    for element in source:
        if element.tag < 0x7FE00010:
            header.add(deepcopy(element))
    for keyword in _TYPE2:
        if keyword not in header:
            setattr(header, keyword, None)
    _repair_copied(header)  # highdicom parses the dates it copies
    return header


_TEMPORAL = {
    "DA": re.compile(r"^\d{8}$"),
    "TM": re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$"),
    "DT": re.compile(r"^\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?$"),
    "AS": re.compile(r"^\d{3}[DWMY]$"),
}


def _repair_copied(sr: Dataset) -> None:
    """Keep what de-identification broke in the source from making the report invalid.

    Masked dates or ages ("***") become empty, which Type 2 and 3 attributes allow; a blank
    DeidentificationMethod next to PatientIdentityRemoved=YES (Type 1C) gets a truthful value.
    """
    for element in sr:
        pattern = _TEMPORAL.get(str(element.VR))
        if pattern is None or element.VM != 1 or element.value in (None, ""):
            continue
        if not pattern.match(str(element.value).strip()):
            element.value = None
    if (
        sr.get("PatientIdentityRemoved") == "YES"
        and not sr.get("DeidentificationMethod")
        and not sr.get("DeidentificationMethodCodeSequence")
    ):
        sr.DeidentificationMethod = "Not stated in the source instances"


def _content_tree(
    findings: Sequence[SeriesFinding],
    impression: str,
    algorithm: AlgorithmInfo,
    *,
    verifier: Verification | None,
    unchanged: set[tuple[str | None, str]] | None,
    procedures: Sequence[Code] = (),
) -> hd.sr.ContainerContentItem:
    """The TID 2000-shaped tree; ``unchanged`` (verified report): the (series, text) pairs still as the model wrote them."""
    root = hd.sr.ContainerContentItem(name=REPORT_TITLE, template_id="2000", is_content_continuous=False)
    root.ContentSequence = hd.sr.ContentSequence(is_root=False)
    root.ContentSequence.extend(hd.sr.LanguageOfContentItemAndDescendants(ENGLISH))
    for procedure in procedures:
        root.ContentSequence.append(hd.sr.CodeContentItem(PROCEDURE_REPORTED, _concept(procedure), relationship_type="HAS CONCEPT MOD"))
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=algorithm.device_uid,
        name=f"{algorithm.name} {algorithm.version}",
        manufacturer_name=algorithm.manufacturer,
        model_name=algorithm.name,
    )
    person = None
    if verifier is not None:
        person = hd.sr.ObserverContext(
            observer_type=codes.DCM.Person,
            observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
                name=verifier.verifier_name, organization_name=verifier.verifier_organization
            ),
        )
    root.ContentSequence.extend(
        hd.sr.ObservationContext(
            observer_person_context=person,
            observer_device_context=hd.sr.ObserverContext(observer_type=codes.DCM.Device, observer_identifying_attributes=device),
        )
    )

    def entry(
        name: hd.sr.CodedConcept, text: str, images: Sequence[ImageRef], series_uid: str | None, finding: SeriesFinding | None = None
    ) -> hd.sr.TextContentItem:
        item = hd.sr.TextContentItem(name=name, value=text, relationship_type="CONTAINS")
        item.ContentSequence = hd.sr.ContentSequence()
        for ref in images:
            item.ContentSequence.append(
                hd.sr.ImageContentItem(
                    name=KEY_IMAGE,
                    referenced_sop_class_uid=ref.sop_class_uid,
                    referenced_sop_instance_uid=ref.sop_instance_uid,
                    referenced_frame_numbers=ref.frame_number,
                    relationship_type="INFERRED FROM",
                )
            )
        if finding is not None and finding.finding_site is not None:
            site = hd.sr.CodeContentItem(FINDING_SITE, _concept(finding.finding_site), relationship_type="HAS CONCEPT MOD")
            if finding.laterality is not None:
                site.ContentSequence = hd.sr.ContentSequence(
                    [hd.sr.CodeContentItem(LATERALITY, _concept(finding.laterality), relationship_type="HAS CONCEPT MOD")]
                )
            item.ContentSequence.append(site)
        # TID 4019 has no row in TID 2000/2002, but both are extensible and the Comprehensive SR IOD allows
        # TEXT -HAS CONCEPT MOD-> TEXT/CODE, which is all TID 4019 consists of. Hanging it on the text it
        # produced mirrors TID 300, where TID 4019 modifies the measurement the algorithm derived.
        if unchanged is None or (series_uid, text) in unchanged:
            item.ContentSequence.extend(
                hd.sr.AlgorithmIdentification(
                    name=algorithm.name,
                    version=algorithm.version,
                    parameters=list(algorithm.parameters),
                    manufacturer=algorithm.manufacturer,
                )
            )
        if not item.ContentSequence:
            del item.ContentSequence
        return item

    for heading, items in (
        (FINDINGS, [entry(FINDING, f.text, f.key_images, f.series_uid, f) for f in findings]),
        (IMPRESSIONS, [entry(IMPRESSION, impression, (), None)]),
    ):
        section = hd.sr.ContainerContentItem(name=heading, relationship_type="CONTAINS", is_content_continuous=False)
        section.ContentSequence = hd.sr.ContentSequence(items)
        root.ContentSequence.append(section)
    return root


def _concept(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)


# -- checks -------------------------------------------------------------------------------


def _check_codes(values: object, where: str) -> list[Code]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{where} must be a sequence of Code, got {values!r}")
    for i, value in enumerate(values):
        if not isinstance(value, Code):
            raise ValueError(f"{where}[{i}] must be a Code, got {value!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{where} holds the same code twice")
    return list(values)


def _check_findings(findings: object, where: str) -> list[SeriesFinding]:
    if isinstance(findings, (str, bytes)) or not isinstance(findings, Sequence) or not findings:
        raise ValueError(f"{where} must be a non-empty sequence of SeriesFinding, got {findings!r}")
    for i, f in enumerate(findings):
        if not isinstance(f, SeriesFinding):
            raise ValueError(f"{where}[{i}] must be a SeriesFinding, got {type(f).__name__}")
    uids = [f.series_uid for f in findings]
    if len(set(uids)) != len(uids):
        raise ValueError(f"{where} holds more than one finding for a series")
    return list(findings)


def _check_evidence(evidence: Sequence[Dataset], findings: Sequence[SeriesFinding]) -> list[Dataset]:
    """Every key image must be an evidence instance of its finding's series, all in one study."""
    if not evidence:
        raise ValueError("evidence is empty: the report must reference its source instances")
    studies = {str(ds.get("StudyInstanceUID", "")) for ds in evidence}
    if len(studies) != 1:
        raise ValueError(f"evidence spans {len(studies)} studies; the report belongs to one")
    series_of: dict[str, str] = {}
    for i, ds in enumerate(evidence):
        ref = ImageRef.of(ds)  # validates the UIDs
        if ref.sop_instance_uid in series_of:
            raise ValueError(f"evidence[{i}] repeats SOPInstanceUID {ref.sop_instance_uid}")
        series_of[ref.sop_instance_uid] = _check_uid(str(ds.get("SeriesInstanceUID", "")), f"evidence[{i}].SeriesInstanceUID")
    classes = {str(ds.SOPInstanceUID): str(ds.SOPClassUID) for ds in evidence}
    for i, finding in enumerate(findings):
        for j, ref in enumerate(finding.key_images):
            where = f"findings[{i}].key_images[{j}]"
            if ref.sop_instance_uid not in series_of:
                raise ValueError(f"{where} ({ref.sop_instance_uid}) is not among the evidence")
            if series_of[ref.sop_instance_uid] != finding.series_uid:
                raise ValueError(
                    f"{where} ({ref.sop_instance_uid}) is in series {series_of[ref.sop_instance_uid]}, not {finding.series_uid}"
                )
            if classes[ref.sop_instance_uid] != ref.sop_class_uid:
                raise ValueError(f"{where} has SOP class {ref.sop_class_uid}, the evidence instance {classes[ref.sop_instance_uid]}")
    return list(evidence)


def _charset(source: Dataset, texts: Iterable[str]) -> str | list[str] | None:
    """The source's SpecificCharacterSet if it can encode our text too, else UTF-8 (ISO_IR 192).

    pydicom holds values decoded, so switching to UTF-8 re-encodes the patient's name losslessly.
    """
    declared = source.get("SpecificCharacterSet")
    # without SpecificCharacterSet only ASCII is allowed (pydicom would read such files as Latin-1)
    python_codecs = convert_encodings(declared) if declared else ["ascii"]
    try:
        for text in texts:
            if not any(_encodes(text, codec) for codec in python_codecs):
                return "ISO_IR 192"
    except LookupError:
        return "ISO_IR 192"
    return list(declared) if isinstance(declared, Sequence) and not isinstance(declared, str) else declared


def _encodes(text: str, codec: str) -> bool:
    try:
        text.encode(codec)
    except UnicodeEncodeError:
        return False
    return True


# -- reading back -------------------------------------------------------------------------


def _code(item: Dataset) -> tuple[str, str]:
    concept = item.ConceptNameCodeSequence[0]
    return str(concept.CodingSchemeDesignator), str(concept.CodeValue)


def _key(concept: hd.sr.CodedConcept) -> tuple[str, str]:
    return concept.scheme_designator, concept.value


def _section(sr: Dataset, heading: hd.sr.CodedConcept, entry: hd.sr.CodedConcept) -> list[Dataset]:
    if _code(sr) != _key(REPORT_TITLE):
        raise ValueError(f"not a MedCap report: the document title is {_code(sr)}")
    return [
        item
        for section in sr.ContentSequence
        if section.ValueType == "CONTAINER" and _code(section) == _key(heading)
        for item in section.get("ContentSequence", [])
        if item.ValueType == "TEXT" and _code(item) == _key(entry)
    ]


def evidence_series(sr: Dataset) -> dict[str, str]:
    """SOP Instance UID → Series Instance UID of every instance in CurrentRequestedProcedureEvidenceSequence."""
    return {
        str(sop.ReferencedSOPInstanceUID): str(series.SeriesInstanceUID)
        for study in sr.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }


def read_findings(sr: Dataset) -> tuple[SeriesFinding, ...]:
    """The findings of a MedCap SR, each with its key images' series taken from the evidence."""
    series_of = evidence_series(sr)
    found = []
    for item in _section(sr, FINDINGS, FINDING):
        refs = []
        site = laterality = None
        for child in item.get("ContentSequence", []):
            if child.ValueType == "IMAGE":
                sop = child.ReferencedSOPSequence[0]
                frames = sop.get("ReferencedFrameNumber")
                frame = int(frames if not isinstance(frames, Sequence) else frames[0]) if frames else None
                refs.append(ImageRef(str(sop.ReferencedSOPClassUID), str(sop.ReferencedSOPInstanceUID), frame))
            elif child.ValueType == "CODE" and _code(child) == _key(FINDING_SITE):
                site = _value_code(child)
                lateral = [c for c in child.get("ContentSequence", []) if c.ValueType == "CODE" and _code(c) == _key(LATERALITY)]
                laterality = _value_code(lateral[0]) if lateral else None
        if not refs or refs[0].sop_instance_uid not in series_of:
            raise ValueError("a finding of the SR cites no key image among its evidence")
        found.append(
            SeriesFinding(series_of[refs[0].sop_instance_uid], str(item.TextValue), refs, finding_site=site, laterality=laterality)
        )
    if not found:
        raise ValueError("the SR has no findings")
    return tuple(found)


def _value_code(item: Dataset) -> Code:
    value = item.ConceptCodeSequence[0]
    return Code(str(value.CodeValue), str(value.CodingSchemeDesignator), str(value.CodeMeaning))


def read_procedures(sr: Dataset) -> list[Code]:
    """The "Procedure reported" codes of a MedCap SR (none in drafts written before grounding)."""
    return [
        _value_code(item)
        for item in sr.get("ContentSequence", [])
        if item.ValueType == "CODE" and item.RelationshipType == "HAS CONCEPT MOD" and _code(item) == _key(PROCEDURE_REPORTED)
    ]


def read_impression(sr: Dataset) -> str:
    items = _section(sr, IMPRESSIONS, IMPRESSION)
    if len(items) != 1:
        raise ValueError(f"the SR has {len(items)} impressions, expected 1")
    return str(items[0].TextValue)


def read_algorithm(sr: Dataset) -> AlgorithmInfo:
    """The model recorded in a MedCap SR's TID 4019 items (on its first finding)."""
    wanted = {
        _key(hd.sr.CodedConcept.from_code(codes.DCM.AlgorithmName)): "name",
        _key(hd.sr.CodedConcept.from_code(codes.DCM.AlgorithmVersion)): "version",
        _key(hd.sr.CodedConcept.from_code(codes.DCM.AlgorithmManufacturer)): "manufacturer",
    }
    for item in _section(sr, FINDINGS, FINDING):
        values: dict[str, str] = {}
        for child in item.get("ContentSequence", []):
            if child.RelationshipType != "HAS CONCEPT MOD" or child.ValueType != "TEXT":
                continue
            if _code(child) in wanted:
                values[wanted[_code(child)]] = str(child.TextValue)
            elif _code(child) == _key(hd.sr.CodedConcept.from_code(codes.DCM.AlgorithmParameters)):
                key, _, value = str(child.TextValue).partition("=")
                values[key] = value
        if {"name", "version", "weights_sha256", "generation_preset"} <= values.keys():
            return AlgorithmInfo(**values)
    raise ValueError("the SR's findings carry no complete TID 4019 algorithm identification")


def _evidence_of(draft: Dataset) -> list[Dataset]:
    """Stand-in evidence datasets for the instances a draft references, carrying its patient and study."""
    stubs = []
    for study in draft.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.ReferencedSeriesSequence:
            for sop in series.ReferencedSOPSequence:
                ds = Dataset()
                for keyword in (
                    "SpecificCharacterSet",
                    "PatientName",
                    "PatientID",
                    "PatientBirthDate",
                    "PatientSex",
                    "AccessionNumber",
                    "StudyID",
                    "StudyDate",
                    "StudyTime",
                    "ReferringPhysicianName",
                ):
                    if keyword in draft:
                        ds[keyword] = deepcopy(draft[keyword])
                ds.StudyInstanceUID = study.StudyInstanceUID
                ds.SeriesInstanceUID = series.SeriesInstanceUID
                ds.SOPClassUID = sop.ReferencedSOPClassUID
                ds.SOPInstanceUID = sop.ReferencedSOPInstanceUID
                stubs.append(ds)
    return stubs
