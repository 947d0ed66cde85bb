"""Header facts: the three shared series as their headers state them, and built headers for each rule and conflict."""

from __future__ import annotations

import pytest
from pydicom import Dataset

from dicom_io.header_facts import (
    PLANE_TOLERANCE_DEG,
    REGIONS,
    Code,
    HeaderFacts,
    Region,
    header_facts,
    plane_of,
    procedure_code,
    regions_in,
    series_facts,
)
from dicom_io.series import read_series
from tests.conftest import series_files

AXIAL = [1, 0, 0, 0, 1, 0]


def built(**attributes: object) -> Dataset:
    ds = Dataset()
    ds.Modality = "CT"
    ds.ImageOrientationPatient = AXIAL
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def coded(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


# -- the shared series ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # GE head CT: BodyPartExamined HEAD, gantry tilted 18.5° (still axial), no contrast attribute or word
        ("ct-head-ge", {"modality": "CT", "region": "head", "plane": "axial", "contrast": None, "laterality": None}),
        # Philips phantom: BodyPartExamined BRAIN (the study description's HEAD agrees), protocol "PLAIN HEAD"
        ("ct-phantom-philips", {"modality": "CT", "region": "brain", "plane": "axial", "contrast": "without", "laterality": None}),
        # UIH MR: BodyPartExamined HEAD, sagittal slices; "sag" in its name is not what says so
        ("mr-t1-brain-uih", {"modality": "MR", "region": "head", "plane": "sagittal", "contrast": None, "laterality": None}),
    ],
)
def test_the_shared_series(name, expected):
    (series,) = read_series(series_files(name))
    facts = series_facts(series)
    got = {"modality": facts.modality, "region": facts.region.term if facts.region else None}
    got |= {k: getattr(facts, k) for k in ("plane", "contrast", "laterality")}
    assert got == expected
    assert facts.source("region") == "BodyPartExamined" and facts.source("plane") == "ImageOrientationPatient"
    assert facts.conflicts == ()
    assert facts.region is not None and facts.region.code is not None and facts.region.code.scheme == "SCT"
    assert HeaderFacts.from_dict(facts.as_dict()) == facts


def test_the_phantoms_contrast_comes_from_its_protocol_name():
    (series,) = read_series(series_files("ct-phantom-philips"))
    assert series_facts(series).source("contrast") == "ProtocolName"  # "1A TRAUMA/PLAIN HEAD DM /Head"


# -- region -----------------------------------------------------------------------------------


def test_the_coded_region_wins_over_body_part_and_descriptions_and_each_disagreement_is_recorded():
    ds = built(AnatomicRegionSequence=[coded("816094009", "SCT", "Chest")], BodyPartExamined="HEAD", SeriesDescription="CT ABDOMEN")
    facts = header_facts(ds)
    assert facts.region is not None and facts.region.term == "chest" and facts.source("region") == "AnatomicRegionSequence"
    assert len(facts.conflicts) == 2
    assert "BodyPartExamined 'HEAD' suggests head" in facts.conflicts[0] and "SeriesDescription 'CT ABDOMEN'" in facts.conflicts[1]


def test_an_old_snomed_rt_code_and_a_code_outside_the_vocabulary():
    assert header_facts(built(AnatomicRegionSequence=[coded("T-D1100", "SRT", "Head")])).region.term == "head"
    facts = header_facts(built(AnatomicRegionSequence=[coded("76248009", "SCT", "Elbow")], BodyPartExamined="KNEE"))
    region = facts.region
    assert region is not None and region.term == "elbow" and region.code == Code("76248009", "SCT", "Elbow")
    assert region.areas == frozenset()  # no area to judge sentences or conflicts by
    assert facts.conflicts == ()


def test_the_coded_region_of_an_enhanced_multiframe_header():
    anatomy = Dataset()
    anatomy.AnatomicRegionSequence = [coded("818981001", "SCT", "Abdomen")]
    anatomy.FrameLaterality = "U"
    shared = Dataset()
    shared.FrameAnatomySequence = [anatomy]
    plane = Dataset()
    plane.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    shared.PlaneOrientationSequence = [plane]
    ds = Dataset()
    ds.Modality = "MR"
    ds.SharedFunctionalGroupsSequence = [shared]
    facts = header_facts(ds)
    assert (facts.region.term if facts.region else None, facts.source("region"), facts.plane, facts.laterality) == (
        "abdomen",
        "FrameAnatomySequence",
        "sagittal",
        None,
    )


def test_body_part_before_descriptions_and_series_description_before_study_description():
    assert header_facts(built(BodyPartExamined="CHEST", StudyDescription="CT THORAX")).source("region") == "BodyPartExamined"
    facts = header_facts(built(SeriesDescription="Lung 1.25mm", StudyDescription="CT CHEST ABDOMEN PELVIS"))
    assert facts.region is not None and (facts.region.term, facts.source("region")) == ("lung", "SeriesDescription")
    assert facts.conflicts == ()  # the lung lies in the chest, which the study covers


def test_an_unknown_body_part_falls_through_to_the_descriptions():
    facts = header_facts(built(BodyPartExamined="XYZZY", ProtocolName="t1_mprage_head"))
    assert facts.region is not None and (facts.region.term, facts.source("region")) == ("head", "ProtocolName")


def test_a_description_naming_incompatible_regions_settles_nothing():
    facts = header_facts(built(StudyDescription="CT HEAD/CHEST"))
    assert facts.region is None and "no area in common" in facts.conflicts[0]


def test_no_region_anywhere_stays_unknown():
    facts = header_facts(built(SeriesDescription="Recon 2 5mm"))
    assert facts.region is None and facts.source("region") is None and facts.conflicts == ()


def test_region_words_longest_phrase_first_and_not_a_region_phrases():
    assert [r.term for r in regions_in("CT chest abdomen pelvis")] == ["chest, abdomen and pelvis"]
    assert [r.term for r in regions_in("t-spine sagittal")] == ["thoracic spine"]
    assert [r.term for r in regions_in("fracture of the femoral head and neck of the femur")] == []
    assert [r.term for r in regions_in("lesion in the head of the pancreas")] == ["pancreas"]


def test_every_vocabulary_region_has_a_snomed_code_and_its_body_part_terms_are_unique():
    assert all(r.code is not None and r.code.scheme == "SCT" for r in REGIONS)
    parts = [p for r in REGIONS for p in r.body_parts]
    assert len(parts) == len(set(parts))


# -- plane ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("iop", "plane"),
    [
        (AXIAL, "axial"),
        ([1, 0, 0, 0, 0, -1], "coronal"),
        ([0, 1, 0, 0, 0, -1], "sagittal"),
        ([1, 0, 0, 0, 0.948, -0.317], "axial"),  # the GE head CT's 18.5° gantry tilt
        ([1, 0, 0, 0, 0.7071, -0.7071], "oblique"),  # 45°: neither axial nor coronal
    ],
)
def test_plane_from_orientation(iop, plane):
    assert plane_of(iop) == plane


def test_the_plane_tolerance_is_a_boundary():
    import math

    inside, outside = math.radians(PLANE_TOLERANCE_DEG - 1), math.radians(PLANE_TOLERANCE_DEG + 1)
    assert plane_of([1, 0, 0, 0, math.cos(inside), -math.sin(inside)]) == "axial"
    assert plane_of([1, 0, 0, 0, math.cos(outside), -math.sin(outside)]) == "oblique"


def test_the_plane_never_comes_from_names_and_a_bad_orientation_leaves_it_unknown():
    ds = Dataset()
    ds.Modality = "MR"
    ds.SeriesDescription = "t2_tse_sag"
    assert header_facts(ds).plane is None
    ds.ImageOrientationPatient = [1, 0, 0, 1, 0, 0]  # degenerate
    assert header_facts(ds).plane is None
    with pytest.raises(ValueError, match="degenerate"):
        plane_of([1, 0, 0, 1, 0, 0])
    with pytest.raises(ValueError, match="six finite"):
        plane_of([1, 0, 0])


# -- contrast ---------------------------------------------------------------------------------


def test_contrast_from_the_agent_and_its_absence_is_not_without():
    facts = header_facts(built(ContrastBolusAgent="Omnipaque 350"))
    assert (facts.contrast, facts.contrast_agent, facts.source("contrast")) == ("with", "Omnipaque 350", "ContrastBolusAgent")
    assert header_facts(built(ContrastBolusAgent="NONE")).contrast == "without"
    assert header_facts(built()).contrast is None


def test_contrast_from_the_other_module_attributes():
    agent = Dataset()
    agent.CodeValue, agent.CodingSchemeDesignator, agent.CodeMeaning = "C-B0317", "SRT", "Iohexol"
    assert header_facts(built(ContrastBolusAgentSequence=[agent])).contrast_agent == "Iohexol"
    assert header_facts(built(ContrastBolusIngredient="IODINE")).contrast == "with"
    assert header_facts(built(ContrastBolusVolume=80)).contrast == "with"
    assert header_facts(built(ContrastBolusVolume=0)).contrast is None
    usage = Dataset()
    usage.ContrastBolusAgentAdministered = "NO"
    assert header_facts(built(ContrastBolusUsageSequence=[usage])).contrast == "without"


def test_contrast_from_descriptions():
    assert header_facts(built(SeriesDescription="Post contrast axial")).contrast == "with"
    assert header_facts(built(ProtocolName="HEAD W/O")).contrast == "without"
    assert header_facts(built(SeriesDescription="T1 C+")).contrast == "with"
    # a study with contrast still holds its pre-contrast series: the study description may only say "without"
    assert header_facts(built(StudyDescription="CT ABDOMEN WITH CONTRAST")).contrast is None
    assert header_facts(built(StudyDescription="CT HEAD NON-CONTRAST")).contrast == "without"
    assert header_facts(built(SeriesDescription="HEAD W/WO CONTRAST")).contrast is None


def test_contrast_conflicts_the_attribute_wins_descriptions_disagreeing_leave_it_unknown():
    facts = header_facts(built(ContrastBolusAgent="Gadovist", SeriesDescription="T1 pre contrast"))
    assert facts.contrast == "with" and "says without contrast; ContrastBolusAgent says with" in facts.conflicts[0]
    facts = header_facts(built(SeriesDescription="arterial post contrast", ProtocolName="PLAIN"))
    assert facts.contrast is None and "descriptions disagree on contrast" in facts.conflicts[0]


# -- laterality and modality ------------------------------------------------------------------


def test_laterality():
    facts = header_facts(built(Laterality="R", BodyPartExamined="KNEE"))
    assert (facts.laterality, facts.laterality_code) == ("right", Code("24028007", "SCT", "Right"))
    assert header_facts(built(ImageLaterality="B")).laterality == "bilateral"
    assert header_facts(built(ImageLaterality="U")).laterality is None  # unpaired: no side
    facts = header_facts(built(Laterality="R", ImageLaterality="L"))
    assert facts.laterality is None and "laterality attributes disagree" in facts.conflicts[0]


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # the malformed modalities on purpose
def test_modality_and_procedure_codes():
    assert header_facts(built(Modality="mr")).modality == "MR"
    facts = header_facts(built(Modality="C T!"))
    assert facts.modality is None and "not a DICOM modality" in facts.conflicts[0]
    assert procedure_code("CT") == Code("77477000", "SCT", "Computed tomography")
    assert procedure_code("US") == Code("US", "DCM", "Ultrasound")


# -- the constructor --------------------------------------------------------------------------


def test_the_constructor_names_the_bad_field():
    with pytest.raises(ValueError, match="HeaderFacts.modality"):
        HeaderFacts(modality="computed tomography")
    with pytest.raises(ValueError, match="HeaderFacts.plane"):
        HeaderFacts(plane="transverse")
    with pytest.raises(ValueError, match="HeaderFacts.contrast_agent"):
        HeaderFacts(contrast="without", contrast_agent="Omnipaque")
    with pytest.raises(ValueError, match="HeaderFacts.sources"):
        HeaderFacts(modality="CT", sources=(("plane", "ImageOrientationPatient"),))
    with pytest.raises(ValueError, match="HeaderFacts.region"):
        HeaderFacts(region="head")
    with pytest.raises(ValueError, match="Region.areas"):
        Region("neck", None, frozenset({"throat"}))
    with pytest.raises(ValueError, match="Code.meaning"):
        Code("1", "SCT", "")
    with pytest.raises(ValueError, match="pydicom Dataset"):
        header_facts({"Modality": "CT"})
