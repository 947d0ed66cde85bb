import dataclasses
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset

from dicom_io.sr import (
    AlgorithmInfo,
    ImageRef,
    SeriesFinding,
    SupersededDraft,
    Verification,
    evidence_series,
    read_algorithm,
    read_findings,
    read_impression,
    write_draft_sr,
    write_verified_sr,
)
from tests.conftest import series_files

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
ALGORITHM = AlgorithmInfo(name="medcap-captioner", version="1.4.0", weights_sha256="ab" * 32, generation_preset="beam4")
VERIFIED_AT = datetime(2025, 3, 4, 10, 30, tzinfo=UTC)


def headers(name: str) -> list[Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in series_files(name)]


def finding(evidence: list[Dataset], text: str = "No acute intracranial abnormality.", picks: tuple[int, ...] = (3, 10)) -> SeriesFinding:
    # one key image as a dataset, the others as (class, instance) references
    first, *rest = (evidence[i] for i in picks)
    return SeriesFinding(evidence[0].SeriesInstanceUID, text, [first, *((ds.SOPClassUID, ds.SOPInstanceUID) for ds in rest)])


def save(ds: Dataset, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def check_file(path: Path) -> Dataset:
    """dciodvfy finds no errors (warnings are printed), dsrdump parses it; returns the file as read back."""
    if shutil.which("dciodvfy") is None or shutil.which("dsrdump") is None:
        pytest.fail("dciodvfy (apt-get install dicom3tools) and dsrdump (apt-get install dcmtk) are needed to validate SRs")
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    if warnings:
        print(f"dciodvfy warnings for {path.name}:", *warnings, sep="\n  ")
    assert not errors, "dciodvfy errors:\n" + "\n".join(errors)
    dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, errors="replace", timeout=60)  # bytes in the SR's charset
    assert dump.returncode == 0 and "Comprehensive SR Document" in dump.stdout, dump.stdout + dump.stderr
    return pydicom.dcmread(path)


def image_refs(sr: Dataset) -> list[str]:
    return [ref.sop_instance_uid for f in read_findings(sr) for ref in f.key_images]


def children(item: Dataset, meaning: str) -> list[Dataset]:
    return [c for c in item.get("ContentSequence", []) if c.ConceptNameCodeSequence[0].CodeMeaning == meaning]


@pytest.fixture(scope="module")
def ge() -> list[Dataset]:
    return headers("ct-head-ge")


@pytest.fixture(scope="module")
def draft(ge: list[Dataset]) -> Dataset:
    return write_draft_sr([finding(ge)], "Normal CT of the head.", ALGORITHM, ge)


def test_draft_ct_is_a_valid_preliminary_tid_2000_report(draft: Dataset, ge: list[Dataset], tmp_path: Path):
    sr = check_file(save(draft, tmp_path, "draft-ct"))
    assert (sr.SOPClassUID, sr.Modality) == (COMPREHENSIVE_SR, "SR")
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == ("PARTIAL", "UNVERIFIED", "PRELIMINARY")
    assert "VerifyingObserverSequence" not in sr and "PredecessorDocumentsSequence" not in sr
    assert sr.StudyInstanceUID == ge[0].StudyInstanceUID and sr.PatientID == ge[0].PatientID
    assert sr.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in ge}
    assert sr.SOPInstanceUID not in {ds.SOPInstanceUID for ds in ge}
    assert "draft" in sr.SeriesDescription and "preliminary" in sr.SeriesDescription
    title = sr.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("18748-4", "LN")
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "2000"
    # key images resolve to evidence instances, in the finding's series
    assert image_refs(sr) == [ge[3].SOPInstanceUID, ge[10].SOPInstanceUID]
    assert set(image_refs(sr)) <= set(evidence_series(sr))
    assert set(evidence_series(sr)) == {ds.SOPInstanceUID for ds in ge}
    assert read_findings(sr)[0].series_uid == ge[0].SeriesInstanceUID
    assert read_impression(sr) == "Normal CT of the head."
    (findings,) = children(sr, "Findings")
    (text,) = children(findings, "Finding")
    assert [c.RelationshipType for c in children(text, "Best illustration of finding")] == ["INFERRED FROM"] * 2
    assert read_algorithm(sr) == ALGORITHM


def test_draft_records_the_model_as_device_observer_and_contributing_equipment(draft: Dataset):
    ai = draft.ContributingEquipmentSequence[-1]
    assert (ai.Manufacturer, ai.ManufacturerModelName, ai.SoftwareVersions) == ("MedCap", "medcap-captioner", "1.4.0")
    assert ai.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"  # Processing Equipment
    assert ai.DeviceUID == ALGORITHM.device_uid and ALGORITHM.weights_sha256 in ai.ContributionDescription
    (uid,) = children(draft, "Device Observer UID")
    assert uid.UID == ALGORITHM.device_uid
    (model,) = children(draft, "Device Observer Model Name")
    assert model.TextValue == "medcap-captioner"


def test_device_uid_follows_the_weights():
    other = dataclasses.replace(ALGORITHM, weights_sha256="cd" * 32)
    assert other.device_uid != ALGORITHM.device_uid
    assert dataclasses.replace(ALGORITHM, version="9", weights_sha256="AB" * 32).device_uid == ALGORITHM.device_uid
    assert ALGORITHM.device_uid.startswith("2.25.") and len(ALGORITHM.device_uid) <= 64


def test_draft_mr_is_valid_despite_masked_source_dates(tmp_path: Path):
    mr = headers("mr-t1-brain-uih")  # de-identified with "***" in DA/DT/AS attributes
    sr = check_file(save(write_draft_sr([finding(mr, "Normal T1 brain.", (5, 20, 35))], "Normal MR.", ALGORITHM, mr), tmp_path, "draft-mr"))
    assert len(image_refs(sr)) == 3 and set(image_refs(sr)) <= set(evidence_series(sr))
    assert sr.PreliminaryFlag == "PRELIMINARY" and sr.StudyInstanceUID == mr[0].StudyInstanceUID
    assert sr.StudyDate == "" and mr[0].StudyDate == "***"  # masked value emptied, caller's dataset untouched


def test_utf8_patient_name_survives(tmp_path: Path):
    ct = headers("ct-phantom-philips")
    for ds in ct:
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = "Müller^Zoë"
    sr = check_file(save(write_draft_sr([finding(ct, "Phantom — uniform.")], "No findings.", ALGORITHM, ct), tmp_path, "draft-utf8"))
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    assert str(sr.PatientName) == "Müller^Zoë" and sr.PatientName.given_name == "Zoë"
    assert read_findings(sr)[0].text == "Phantom — uniform."


def test_source_character_set_is_kept_unless_the_text_needs_more(ge: list[Dataset], tmp_path: Path):
    assert ge[0].SpecificCharacterSet == "ISO_IR 100"
    latin = write_draft_sr([finding(ge, "Läsion 5 mm.")], "Keine.", ALGORITHM, ge)
    assert latin.SpecificCharacterSet == "ISO_IR 100"
    wider = check_file(save(write_draft_sr([finding(ge, "Lesion ≥ 5 mm.")], "None.", ALGORITHM, ge), tmp_path, "wider"))
    assert wider.SpecificCharacterSet == "ISO_IR 192" and read_findings(wider)[0].text == "Lesion ≥ 5 mm."


def test_source_without_character_set_stays_ascii_or_becomes_utf8(ge: list[Dataset], tmp_path: Path):
    plain = [pydicom.dcmread(p, stop_before_pixels=True) for p in series_files("ct-head-ge")]
    for ds in plain:
        del ds.SpecificCharacterSet
    assert "SpecificCharacterSet" not in write_draft_sr([finding(plain)], "None.", ALGORITHM, plain)
    sr = check_file(save(write_draft_sr([finding(plain, "Zoë's scan.")], "None.", ALGORITHM, plain), tmp_path, "ascii-source"))
    assert sr.SpecificCharacterSet == "ISO_IR 192" and read_findings(sr)[0].text == "Zoë's scan."


def test_verified_report_supersedes_the_draft(draft: Dataset, ge: list[Dataset], tmp_path: Path):
    edited = dataclasses.replace(read_findings(draft)[0], text="Small chronic lacunar infarct, left basal ganglia.")
    verification = Verification("Smith^Jane", "General Hospital", VERIFIED_AT)
    sr = check_file(save(write_verified_sr(draft, verification, findings=[edited]), tmp_path, "verified"))
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == ("COMPLETE", "VERIFIED", "FINAL")
    observer = sr.VerifyingObserverSequence[0]
    assert (str(observer.VerifyingObserverName), observer.VerifyingOrganization) == ("Smith^Jane", "General Hospital")
    assert observer.VerificationDateTime == "20250304103000+0000"
    predecessor = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == draft.SOPInstanceUID
    assert sr.SOPInstanceUID != draft.SOPInstanceUID and sr.SeriesInstanceUID != draft.SeriesInstanceUID
    assert (sr.StudyInstanceUID, sr.PatientName, sr.PatientID) == (draft.StudyInstanceUID, draft.PatientName, draft.PatientID)
    assert read_findings(sr) == (edited,) and read_impression(sr) == "Normal CT of the head."
    assert set(evidence_series(sr)) == {ds.SOPInstanceUID for ds in ge}
    assert sr.ContributingEquipmentSequence[-1].DeviceUID == ALGORITHM.device_uid
    (person,) = children(sr, "Person Observer Name")
    assert person.PersonName == "Smith^Jane"
    # the edited finding is no longer the model's text; the untouched impression still is
    (findings,), (impressions,) = children(sr, "Findings"), children(sr, "Impressions")
    assert children(children(findings, "Finding")[0], "Algorithm Name") == []
    assert [a.TextValue for a in children(children(impressions, "Impression")[0], "Algorithm Name")] == ["medcap-captioner"]


def test_verified_non_ascii_verifier(draft: Dataset, tmp_path: Path):
    sr = check_file(
        save(
            write_verified_sr(draft, Verification("Ødegård^Åse", "Sykehus", VERIFIED_AT), impression="Normal."), tmp_path, "verified-latin1"
        )
    )
    assert sr.SpecificCharacterSet == "ISO_IR 100"  # the source's, which encodes these names
    assert sr.VerifyingObserverSequence[0].VerifyingObserverName == "Ødegård^Åse"
    assert read_findings(sr) == read_findings(draft) and read_impression(sr) == "Normal."
    (impressions,) = children(sr, "Impressions")
    assert "ContentSequence" not in children(impressions, "Impression")[0]  # edited: no TID 4019 left


def test_constructors_name_the_bad_field(ge: list[Dataset], draft: Dataset):
    series = ge[0].SeriesInstanceUID
    with pytest.raises(ValueError, match="SeriesFinding.text must be non-empty"):
        SeriesFinding(series, "  ", [ge[0]])
    with pytest.raises(ValueError, match="SeriesFinding.key_images is empty"):
        SeriesFinding(series, "x", [])
    with pytest.raises(ValueError, match="SeriesFinding.series_uid must be a DICOM UID"):
        SeriesFinding("not-a-uid", "x", [ge[0]])
    with pytest.raises(ValueError, match=r"SeriesFinding.key_images\[0\]: ImageRef.sop_instance_uid"):
        SeriesFinding(series, "x", [("1.2.3", "")])
    with pytest.raises(ValueError, match="AlgorithmInfo.weights_sha256 must be 64 hex digits"):
        dataclasses.replace(ALGORITHM, weights_sha256="abc")
    with pytest.raises(ValueError, match="AlgorithmInfo.name"):
        dataclasses.replace(ALGORITHM, name="")
    with pytest.raises(ValueError, match="findings must be a non-empty sequence"):
        write_draft_sr([], "x", ALGORITHM, ge)
    with pytest.raises(ValueError, match="impression must be non-empty"):
        write_draft_sr([finding(ge)], "", ALGORITHM, ge)
    with pytest.raises(ValueError, match="evidence is empty"):
        write_draft_sr([finding(ge)], "x", ALGORITHM, [])
    with pytest.raises(ValueError, match=r"findings\[0\].key_images\[0\] .* is not among the evidence"):
        write_draft_sr([finding(ge)], "x", ALGORITHM, ge[4:])
    with pytest.raises(ValueError, match=r"findings\[0\].key_images\[0\] .* is in series"):
        write_draft_sr([SeriesFinding("1.2.3", "x", [ge[0]])], "x", ALGORITHM, ge)
    with pytest.raises(ValueError, match="Verification.verifier_name must be non-empty"):
        Verification("", "General Hospital", VERIFIED_AT)
    with pytest.raises(ValueError, match="Verification.verifier_name must be a DICOM person name"):
        Verification("Jane Smith", "General Hospital", VERIFIED_AT)
    with pytest.raises(ValueError, match="Verification.verifier_organization"):
        Verification("Smith^Jane", "", VERIFIED_AT)
    with pytest.raises(ValueError, match="Verification.verified_at must be a timezone-aware"):
        Verification("Smith^Jane", "General Hospital", datetime(2025, 1, 1))
    with pytest.raises(ValueError, match="verification must be a Verification"):
        write_verified_sr(draft, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="impression must be non-empty"):
        write_verified_sr(draft, Verification("Smith^Jane", "H", VERIFIED_AT), impression=" ")
    verified = write_verified_sr(draft, Verification("Smith^Jane", "H", VERIFIED_AT + timedelta(hours=1)))
    with pytest.raises(ValueError, match="draft must be an unverified SR"):
        write_verified_sr(verified, Verification("Smith^Jane", "H", VERIFIED_AT))


def test_image_ref_accepts_frames():
    assert ImageRef.of(("1.2.3", "1.2.3.4", 2)).frame_number == 2
    with pytest.raises(ValueError, match="ImageRef.frame_number"):
        ImageRef("1.2.3", "1.2.3.4", 0)


# -- header facts as coded content (grounding, docs/header-facts.md) ------------------------------


def test_header_facts_are_coded_procedure_finding_site_and_laterality_and_survive_verification(ge: list[Dataset], tmp_path: Path):
    from dicom_io.header_facts import LATERALITY_CODES, REGIONS, procedure_code
    from dicom_io.sr import read_procedures

    head = next(r for r in REGIONS if r.term == "head").code
    coded = dataclasses.replace(finding(ge, "CT head, axial: no focal lesion."), finding_site=head, laterality=LATERALITY_CODES["left"])
    draft = check_file(
        save(write_draft_sr([coded], "No focal lesion.", ALGORITHM, ge, procedures=[procedure_code("CT")]), tmp_path, "coded")
    )
    assert read_procedures(draft) == [procedure_code("CT")]
    (procedure,) = children(draft, "Procedure reported")
    assert (procedure.RelationshipType, procedure.ConceptCodeSequence[0].CodeValue) == ("HAS CONCEPT MOD", "77477000")
    (findings,) = children(draft, "Findings")
    (site,) = children(children(findings, "Finding")[0], "Finding Site")
    assert (site.ValueType, site.ConceptCodeSequence[0].CodeValue, site.ConceptCodeSequence[0].CodingSchemeDesignator) == (
        "CODE",
        "69536005",
        "SCT",
    )
    assert children(site, "Laterality")[0].ConceptCodeSequence[0].CodeMeaning == "Left"
    assert read_findings(draft) == (coded,)
    # the radiologist edits the text: the header's codes are no one's text and stay
    edited = SeriesFinding(coded.series_uid, "CT head, axial: old left lacunar infarct.", coded.key_images)
    verified = check_file(
        save(
            write_verified_sr(draft, Verification("Smith^Jane", "General Hospital", VERIFIED_AT), findings=[edited]),
            tmp_path,
            "coded-verified",
        )
    )
    (final,) = read_findings(verified)
    assert (final.text, final.finding_site, final.laterality) == (edited.text, head, LATERALITY_CODES["left"])
    assert read_procedures(verified) == [procedure_code("CT")]


def test_coded_content_is_checked(ge: list[Dataset]):
    from dicom_io.header_facts import LATERALITY_CODES

    series = ge[0].SeriesInstanceUID
    with pytest.raises(ValueError, match="SeriesFinding.laterality qualifies a finding site"):
        SeriesFinding(series, "x", [ge[0]], laterality=LATERALITY_CODES["left"])
    with pytest.raises(ValueError, match="SeriesFinding.finding_site must be a Code"):
        SeriesFinding(series, "x", [ge[0]], finding_site=("69536005", "SCT", "Head"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"procedures\[0\] must be a Code"):
        write_draft_sr([finding(ge)], "x", ALGORITHM, ge, procedures=["CT"])  # type: ignore[list-item]


def test_a_superseding_draft_references_the_earlier_draft_and_says_so(draft: Dataset, ge: list[Dataset], tmp_path: Path):
    earlier = SupersededDraft(draft.StudyInstanceUID, draft.SeriesInstanceUID, draft.SOPClassUID, draft.SOPInstanceUID, study_version=1)
    later = write_draft_sr([finding(ge)], "Normal CT of the head.", ALGORITHM, ge, instance_number=2, supersedes=earlier)
    sr = check_file(save(later, tmp_path, "superseding-draft"))
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.InstanceNumber) == ("PARTIAL", "UNVERIFIED", 2)
    ref = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (COMPREHENSIVE_SR, draft.SOPInstanceUID)
    assert sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].SeriesInstanceUID == draft.SeriesInstanceUID
    assert (
        read_impression(sr)
        == f"Supersedes the AI draft of study version 1 (SR {draft.SOPInstanceUID}), made before later images arrived. Normal CT of the head."
    )
    # approved unchanged, the verified report keeps the sentence and names the new draft as its predecessor
    verified = check_file(save(write_verified_sr(sr, Verification("Smith^Jane", "General Hospital", VERIFIED_AT)), tmp_path, "verified-2"))
    assert (
        verified.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        == sr.SOPInstanceUID
    )


def test_what_a_draft_supersedes_is_checked(ge: list[Dataset], draft: Dataset):
    with pytest.raises(ValueError, match="SupersededDraft.sop_instance_uid must be a DICOM UID"):
        SupersededDraft(draft.StudyInstanceUID, draft.SeriesInstanceUID, COMPREHENSIVE_SR, "not-a-uid", 1)
    with pytest.raises(ValueError, match="SupersededDraft.study_version must be an integer >= 1"):
        SupersededDraft(draft.StudyInstanceUID, draft.SeriesInstanceUID, COMPREHENSIVE_SR, draft.SOPInstanceUID, 0)
    other_study = SupersededDraft("1.2.3", draft.SeriesInstanceUID, COMPREHENSIVE_SR, draft.SOPInstanceUID, 1)
    with pytest.raises(ValueError, match="supersedes.study_uid: the earlier draft is of study 1.2.3"):
        write_draft_sr([finding(ge)], "None.", ALGORITHM, ge, supersedes=other_study)
    with pytest.raises(ValueError, match="supersedes must be a SupersededDraft"):
        write_draft_sr([finding(ge)], "None.", ALGORITHM, ge, supersedes=draft)  # type: ignore[arg-type]
