import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_io.review_facts import plane_of, series_facts, study_facts
from tests.conftest import series_files


@pytest.mark.parametrize(
    "orientation, plane",
    [
        ([1, 0, 0, 0, 1, 0], "axial"),
        ([1, 0, 0, 0, 0.948, -0.317], "axial"),  # an 18° gantry tilt is still read as axial
        ([0, 1, 0, 0, 0, -1], "sagittal"),
        ([1, 0, 0, 0, 0, -1], "coronal"),
        ([1, 0, 0, 0, 0.7071, -0.7071], "oblique"),
        (None, None),
        (["x"], None),
    ],
)
def test_plane_of(orientation, plane):
    assert plane_of(orientation) == plane


def test_series_facts_of_real_headers():
    ct = series_facts(pydicom.dcmread(series_files("ct-head-ge")[0], stop_before_pixels=True))
    assert (ct.modality, ct.body_part, ct.plane, ct.contrast, ct.slice_thickness_mm) == ("CT", "HEAD", "axial", None, 4.0)
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
    assert series_facts(ds).contrast == "Iohexol"
    ds.PatientAge = "007M"
    assert study_facts(ds).patient_age == "7 mo"
    assert study_facts(Dataset()) == study_facts(Dataset())  # nothing in the header: all None, no error
    assert study_facts(Dataset()).patient_age is None
