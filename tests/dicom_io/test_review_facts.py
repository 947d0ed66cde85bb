import pydicom
from pydicom.dataset import Dataset

from dicom_io.review_facts import series_facts, study_facts
from tests.conftest import series_files


def test_series_facts_are_the_grounding_facts_in_the_reviewers_words():
    ds = Dataset()
    ds.Modality, ds.BodyPartExamined, ds.Laterality = "CT", "CHEST", "L"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.7071, -0.7071]  # 45°: oblique
    ds.ContrastBolusAgent = "Iohexol"
    facts = series_facts(ds)
    assert (facts.modality, facts.body_part, facts.plane, facts.contrast, facts.laterality) == (
        "CT",
        "chest",
        "oblique",
        "with (Iohexol)",
        "left",
    )
    assert series_facts(ds, (0, 1, 0, 0, 0, -1)).plane == "sagittal"  # the series' own orientation wins
    empty = series_facts(Dataset())
    assert (empty.modality, empty.body_part, empty.plane, empty.contrast) == ("?", None, None, None)


def test_series_facts_of_real_headers():
    ct = series_facts(pydicom.dcmread(series_files("ct-head-ge")[0], stop_before_pixels=True))
    assert (ct.modality, ct.body_part, ct.plane, ct.contrast, ct.slice_thickness_mm) == ("CT", "head", "axial", None, 4.0)
    mr = series_facts(pydicom.dcmread(series_files("mr-t1-brain-uih")[0], stop_before_pixels=True))
    assert (mr.modality, mr.plane, mr.description) == ("MR", "sagittal", "t1_gre_fsp_3d_sag")


def test_study_facts_from_the_request_and_the_patient():
    ds = Dataset()
    ds.PatientSex, ds.PatientBirthDate, ds.StudyDate = "F", "19700615", "20260101"
    ds.ContrastBolusAgent = "Iohexol"
    request = Dataset()
    request.ReasonForTheRequestedProcedure = "Sudden headache, rule out haemorrhage"
    request.RequestedProcedurePriority = "STAT"
    ds.RequestAttributesSequence = [request]
    facts = study_facts(ds)
    assert (facts.patient_age, facts.patient_sex, facts.priority) == ("55 y", "F", "STAT")
    assert facts.clinical_question == "Sudden headache, rule out haemorrhage"
    assert series_facts(ds).contrast == "with (Iohexol)"
    ds.PatientAge = "007M"
    assert study_facts(ds).patient_age == "7 mo"
    assert study_facts(Dataset()) == study_facts(Dataset())  # nothing in the header: all None, no error
    assert study_facts(Dataset()).patient_age is None
