"""The pages a radiologist uses, end to end over HTTP on the real database: worklist, review, key images, approval."""

from __future__ import annotations

import html
import re
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select, update

from dicom_io.sr import read_impression
from service.schema import AuditEvent, SRDocument
from tests.service.web.conftest import sign_in


@pytest.mark.peers
def test_a_radiologist_reviews_edits_and_approves_a_draft(client, accounts, draft_id, db):
    sign_in(client, "smith")
    worklist = client.get("/worklist")
    assert worklist.status_code == 200 and f'href="/drafts/{draft_id}"' in worklist.text
    assert re.search(r'data-state="awaiting review">1<', worklist.text)
    page = client.get(f"/drafts/{draft_id}")
    assert page.status_code == 200 and "AI draft — preliminary, not verified" in page.text
    images = re.findall(r'<img src="([^"]+)"', page.text)
    assert len(images) == 3
    png = client.get(images[0].replace("&amp;", "&"))
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    series_field = re.search(r'name="(finding:[0-9.]+)"', page.text).group(1)
    approved = client.post(
        f"/drafts/{draft_id}/approve", data={"csrf_token": csrf, series_field: "Edited finding.", "impression": "Normal."}
    )
    assert approved.status_code == 303
    after = client.get(approved.headers["location"])
    assert "Approved by a radiologist" in after.text and 'id="review-state">approved<' in after.text
    assert approved.headers["location"].startswith(f"/drafts/{draft_id}?notice=approved_last&draft={draft_id}&sr=")
    assert re.search(
        rf'role="status">Approved draft {draft_id}\. Verified report [0-9.]+ is on its way to the PACS\. No more drafts await review\.<',
        after.text,
    )
    with db.session() as s:
        verified = s.scalars(select(SRDocument).where(SRDocument.kind == "verified")).one()
        viewed = s.scalars(select(AuditEvent).where(AuditEvent.action == "study.viewed")).first()
    assert pydicom.dcmread(verified.path).VerificationFlag == "VERIFIED"
    assert viewed.actor == "user:smith" and viewed.details["address"] == "testclient"


@pytest.mark.peers
def test_approval_without_the_csrf_token_is_refused_and_recorded(client, accounts, draft_id, db):
    sign_in(client, "smith")
    response = client.post(f"/drafts/{draft_id}/approve", data={"impression": "Normal."})
    assert response.status_code == 403
    with db.session() as s:
        denied = s.scalars(select(AuditEvent).where(AuditEvent.action == "auth.access_denied")).one()
        assert s.scalars(select(SRDocument).where(SRDocument.kind == "verified")).all() == []
    assert denied.details["reason"] == "missing or wrong CSRF token"


@pytest.mark.peers
def test_the_review_page_reads_no_sr_file_and_an_older_draft_its_file_once(client, accounts, draft_id, db, dcmread_calls):
    with db.session() as s:
        doc = s.get(SRDocument, draft_id)
    stored = read_impression(pydicom.dcmread(doc.path))
    assert doc.impression == stored  # written with the SR
    sign_in(client, "smith")
    dcmread_calls.clear()
    for _ in range(2):
        assert client.get(f"/drafts/{draft_id}").status_code == 200
    assert Path(doc.path) not in dcmread_calls
    with db.session() as s:  # a draft written before migration 0007
        s.execute(update(SRDocument).where(SRDocument.id == draft_id).values(impression=None))
    for _ in range(3):
        page = client.get(f"/drafts/{draft_id}")
        assert page.status_code == 200 and html.escape(stored, quote=False) in page.text
    assert dcmread_calls.count(Path(doc.path)) == 1  # its first view reads the file and keeps the text
    with db.session() as s:
        assert s.get(SRDocument, draft_id).impression == stored


@pytest.mark.peers
def test_a_link_cannot_make_the_review_page_say_what_it_likes(client, accounts, draft_id):
    sign_in(client, "smith")
    for query in (
        "message=Your+session+expired.+Sign+in+again+at+evil.example",
        "notice=Your+session+expired",
        "notice=approved&sr=call+555-0100",
        "notice=approved&sr=" + "1." * 40 + "1",
    ):
        page = client.get(f"/drafts/{draft_id}?{query}")
        assert page.status_code == 200 and 'role="status"' not in page.text, query
        assert "evil" not in page.text and "555" not in page.text and "expired" not in page.text, query
