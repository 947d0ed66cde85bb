"""The review page and the API show the reviewer which model sentences grounding removed, and why."""

from __future__ import annotations

import html

import pytest
from sqlalchemy import update

from service.schema import Draft
from tests.service.web.conftest import sign_in

REMOVED = [
    {
        "sentence": "axial mr of the chest no focal lesion",
        "reasons": ["names MR; the header says CT (Modality)", "names the chest; the series is of the head (BodyPartExamined)"],
    }
]


@pytest.mark.peers
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_removed_sentences_are_shown_with_their_reasons(client, accounts, draft_id, db):
    sign_in(client, "smith")
    page = client.get(f"/drafts/{draft_id}")
    assert page.status_code == 200
    with db.session() as s:
        s.execute(update(Draft).where(Draft.sr_document_id == draft_id).values(removed_sentences=REMOVED))
    page = html.unescape(client.get(f"/drafts/{draft_id}").text)
    assert "1 model sentence(s) removed: they contradict the DICOM header" in page
    assert "“axial mr of the chest no focal lesion” — names MR; the header says CT (Modality); names the chest" in page
    (series,) = client.get(f"/api/drafts/{draft_id}").json()["series"]
    assert series["removed_sentences"] == REMOVED


@pytest.mark.peers
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_no_block_when_nothing_was_removed(client, accounts, draft_id, db):
    sign_in(client, "smith")
    with db.session() as s:
        s.execute(update(Draft).where(Draft.sr_document_id == draft_id).values(removed_sentences=[]))
    assert "removed-sentences" not in client.get(f"/drafts/{draft_id}").text
    with db.session() as s:  # a draft from before grounding (NULL)
        s.execute(update(Draft).where(Draft.sr_document_id == draft_id).values(removed_sentences=None))
    page = client.get(f"/drafts/{draft_id}")
    assert page.status_code == 200 and "removed-sentences" not in page.text


@pytest.mark.peers
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_demo_model_draft_carries_a_banner_that_says_so(client, accounts, draft_id, db):
    from models.demo import DEMO_MODEL_NAME

    sign_in(client, "smith")
    assert 'id="demo-banner"' not in client.get(f"/drafts/{draft_id}").text
    with db.session() as s:
        s.execute(update(Draft).where(Draft.sr_document_id == draft_id).values(model_name=DEMO_MODEL_NAME))
    page = html.unescape(client.get(f"/drafts/{draft_id}").text)
    assert 'id="demo-banner"' in page and "for trying MedCap only" in page
