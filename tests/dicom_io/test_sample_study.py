"""The sample patient of `medcap sample`: valid DICOM (dicom3tools' dciodvfy), realistic units, stable UIDs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from dicom_io.intensity import CT_WINDOWS
from dicom_io.review_facts import series_facts, study_facts
from dicom_io.sample_study import PATIENT_ID, write_sample
from dicom_io.series import read_series

DCIODVFY = "/usr/bin/dciodvfy"


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    return write_sample(tmp_path_factory.mktemp("sample"))


def test_the_sample_is_a_head_ct_and_a_brain_mr_of_one_patient(sample):
    (ct,) = read_series(sample["ct-head"])
    (mr,) = read_series(sample["mr-brain"])
    assert (ct.modality, len(ct), mr.modality, len(mr)) == ("CT", 24, "MR", 20)
    assert ct.study_uid != mr.study_uid and ct.header.PatientID == mr.header.PatientID == PATIENT_ID
    assert ct.spacing_mm == 5.0 and ct.positions == tuple(sorted(ct.positions))
    middle = ct.slices[14].pixels  # HU: air, bone, brain and the hyperdense focus are where a reader expects them
    assert middle.min() < -990 and middle.max() > 1000
    brain = middle[100:160, 100:160]
    assert 20 < float(brain.mean()) < 45
    assert ((middle > 60) & (middle < 80)).sum() > 20  # the focus
    assert CT_WINDOWS["brain"].apply(brain).std() > 0.02  # grey and white matter differ in the brain window
    facts, request = series_facts(ct.header), study_facts(ct.header)
    assert (facts.plane, facts.body_part, request.priority, request.patient_sex) == ("axial", "head", "STAT", "O")
    assert request.clinical_question == "Sudden severe headache; rule out haemorrhage"


def test_the_sample_is_valid_dicom_and_the_same_every_time(sample, tmp_path):
    if not Path(DCIODVFY).exists():
        pytest.fail("dicom3tools is not installed (apt-get install dicom3tools)")
    for files in sample.values():
        checked = subprocess.run([DCIODVFY, str(files[0])], capture_output=True, text=True)
        assert [line for line in checked.stderr.splitlines() if line.startswith("Error")] == []
    again = write_sample(tmp_path)
    assert [p.read_bytes() for p in again["ct-head"]] == [p.read_bytes() for p in sample["ct-head"]]
