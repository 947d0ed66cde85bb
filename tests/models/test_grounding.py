"""Grounding: which sentences contradict which header facts, the heading, the removals, the contradiction count."""

from __future__ import annotations

import pytest

from dicom_io.header_facts import REGIONS, HeaderFacts
from models.grounding import (
    ContradictionCount,
    GroundedDraft,
    Removal,
    contradictions,
    count_contradictions,
    ground,
    heading,
    prompt_for,
    sentences,
)

REGION = {r.term: r for r in REGIONS}
CT_HEAD = HeaderFacts(
    modality="CT",
    region=REGION["head"],
    plane="axial",
    sources=(("modality", "Modality"), ("region", "BodyPartExamined"), ("plane", "ImageOrientationPatient")),
)
UNKNOWN = HeaderFacts()


# The demo model's drafts of the shared head CT, as issue 14 quotes them.
DEMO_HEAD_CT = "axial mr of the abdomen no focal lesion. sagittal mr of the chest large hypointense lesion in the anterior lung. axial ct of the chest no focal lesion."


def test_the_demo_models_head_ct_draft_loses_every_sentence_each_with_its_reasons():
    draft = ground([DEMO_HEAD_CT], CT_HEAD)
    assert draft.kept == ()
    assert [r.sentence for r in draft.removed] == [
        "axial mr of the abdomen no focal lesion",
        "sagittal mr of the chest large hypointense lesion in the anterior lung",
        "axial ct of the chest no focal lesion",
    ]
    assert draft.removed[0].reasons == (
        "names MR; the header says CT (Modality)",
        "names the abdomen; the series is of the head (BodyPartExamined)",
    )
    assert "names the sagittal plane; the slices are axial (ImageOrientationPatient)" in draft.removed[1].reasons
    assert draft.text == "CT head, axial: (every sentence of the model contradicted the DICOM header and was removed)"


@pytest.mark.parametrize(
    "sentence",
    [
        "axial ct of the head. no focal lesion",
        "small hyperdense lesion in the left hemisphere",  # brain lies in the head
        "superior sagittal sinus is patent",  # anatomy, not a plane
        "fracture of the femoral head",  # not the head region
        "no contrast-enhanced images were provided",  # the header does not say either way
    ],
)
def test_sentences_that_agree_or_name_nothing_the_header_settles(sentence):
    assert contradictions(sentence, CT_HEAD) == []


@pytest.mark.parametrize(
    ("sentence", "reason"),
    [
        ("MRI shows a lesion", "names MR"),
        ("on T2-weighted images the lesion is bright", "names MR"),
        ("coronal reformat shows no fracture", "names the coronal plane"),
        ("no pneumothorax in the chest", "names the chest"),
        ("CT of the abdomen and pelvis", "names the abdomen and pelvis"),
    ],
)
def test_sentences_that_contradict_a_fact(sentence, reason):
    reasons = contradictions(sentence, CT_HEAD)
    assert any(r.startswith(reason) for r in reasons), reasons


def test_an_organ_of_an_adjacent_area_is_tolerated_a_region_is_not():
    chest = HeaderFacts(modality="CT", region=REGION["chest"], sources=(("modality", "Modality"), ("region", "BodyPartExamined")))
    assert contradictions("hypodense lesion in the liver dome", chest) == []  # the liver lies next to the chest
    assert contradictions("ct of the abdomen", chest) == ["names the abdomen; the series is of the chest (BodyPartExamined)"]
    assert contradictions("lesion in the left hemisphere", chest)  # the head is no neighbour of the chest


def test_contrast_sentences_are_judged_only_when_the_header_states_contrast():
    plain = HeaderFacts(modality="CT", contrast="without", sources=(("modality", "Modality"), ("contrast", "ProtocolName")))
    assert contradictions("contrast-enhanced CT shows a ring-enhancing lesion", plain) == [
        "says with contrast; the header says without contrast (ProtocolName)"
    ]
    assert contradictions("non-contrast CT without acute findings", plain) == []
    assert contradictions("good grey-white matter contrast", plain) == []  # no claim about a contrast agent
    assert contradictions("contrast-enhanced CT", CT_HEAD) == []  # the header does not say


def test_oblique_slices_contradict_any_named_plane_and_unknown_facts_contradict_nothing():
    oblique = HeaderFacts(plane="oblique", sources=(("plane", "ImageOrientationPatient"),))
    assert contradictions("axial image through the orbits", oblique) == [
        "names the axial plane; the slices are oblique (ImageOrientationPatient)"
    ]
    assert contradictions("sagittal mr of the chest with contrast", UNKNOWN) == []


def test_hybrid_modalities_are_not_contradictions():
    pet = HeaderFacts(modality="PT", sources=(("modality", "Modality"),))
    assert contradictions("PET/CT shows an avid node", pet) == []
    assert contradictions("ultrasound shows an avid node", pet) == ["names ultrasound; the header says PT (Modality)"]


def test_a_region_outside_the_vocabulary_judges_no_sentence():
    from dicom_io.header_facts import Code, Region

    elbow = HeaderFacts(
        region=Region("elbow", Code("76248009", "SCT", "Elbow"), frozenset()), sources=(("region", "AnatomicRegionSequence"),)
    )
    assert contradictions("ct of the chest", elbow) == []


def test_heading_leaves_out_what_the_header_does_not_say():
    assert heading(CT_HEAD) == "CT head, axial:"
    full = HeaderFacts(modality="MR", region=REGION["knee"], plane="sagittal", contrast="with", laterality="right")
    assert heading(full) == "MR knee, right, sagittal, with contrast:"
    assert heading(UNKNOWN) == "Image series:"
    assert "CT head, axial" in prompt_for(CT_HEAD)


def test_a_grounded_draft_keeps_agreeing_sentences_in_order_once():
    draft = ground(["axial ct of the head. no focal lesion.", "no focal lesion. axial mr of the head."], CT_HEAD)
    assert draft.kept == ("axial ct of the head", "no focal lesion")
    assert [r.sentence for r in draft.removed] == ["axial mr of the head"]
    assert draft.text == "CT head, axial: axial ct of the head. no focal lesion."
    assert draft.body == "axial ct of the head. no focal lesion."
    assert ground([""], CT_HEAD).text == "CT head, axial: (the model produced no text for this series)"


def test_contradiction_counts_add_up_and_the_grounded_count_is_zero():
    before = count_contradictions(sentences([DEMO_HEAD_CT, "no focal lesion."]), CT_HEAD)
    assert (before.contradicting, before.sentences, before.rate) == (3, 4, 0.75)
    after = count_contradictions(ground([DEMO_HEAD_CT, "no focal lesion."], CT_HEAD).kept, CT_HEAD)
    assert (after.contradicting, after.sentences) == (0, 1)
    assert (before + after).as_dict() == {"contradicting": 3, "sentences": 5, "rate": 0.6}
    assert ContradictionCount().rate is None


def test_constructors_name_the_bad_field():
    with pytest.raises(ValueError, match="Removal.reasons"):
        Removal("axial mr", ())
    with pytest.raises(ValueError, match="Removal.sentence"):
        Removal(" ", ("x",))
    with pytest.raises(ValueError, match="GroundedDraft.heading"):
        GroundedDraft("CT head", (), ())
    with pytest.raises(ValueError, match="GroundedDraft.removed"):
        GroundedDraft("CT head:", (), ("axial mr",))
    with pytest.raises(ValueError, match="ContradictionCount"):
        ContradictionCount(2, 1)
