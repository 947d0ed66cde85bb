"""The JSON API (/api) on the real app and database (both backends): the worklist with its filters and counts,
a draft's detail, approving with edits, rejecting, conflicts, bad input, the CSRF header, the OpenAPI schema."""

from __future__ import annotations

import pydicom
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from dicom_io.sr import read_findings, read_impression
from service.schema import AuditEvent, Review, SRDocument
from tests.pipeline import MR, draft_study
from tests.service.web.conftest import sign_in
from tests.service.web.test_authorization import clone_draft


@pytest.fixture
def radiologist(client, accounts) -> dict[str, str]:
    """Headers for a signed-in radiologist's POSTs."""
    return {"X-CSRF-Token": sign_in(client, "smith")}


@pytest.fixture
def two_drafts(db, clock, settings, listener, assembler, captioner, draft_id) -> dict[str, int]:
    """The CT draft (drafted on 2026-01-01) and an MR draft of another patient drafted three days later."""
    clock.advance(3 * 86400)
    mr = draft_study(db, clock, settings, listener, assembler, captioner, MR)
    return {"CT": draft_id, "MR": mr}


def ids(response) -> list[int]:
    assert response.status_code == 200, response.text
    return [d["draft_id"] for d in response.json()["drafts"]]


def test_me(client, accounts):
    assert client.get("/api/me").status_code == 401
    csrf = sign_in(client, "smith")
    me = client.get("/api/me").json()
    assert me == {"username": "smith", "display_name": "Smith^Jane", "role": "radiologist", "csrf_token": csrf}
    assert len(csrf) >= 32


@pytest.mark.peers
def test_worklist_filters_and_counts(client, two_drafts, radiologist, db):  # signed in after the clock moved on
    ct, mr = two_drafts["CT"], two_drafts["MR"]
    everything = client.get("/api/drafts")
    assert ids(everything) == [ct, mr]  # awaiting review by default, oldest first
    assert everything.json()["counts"] == {"awaiting review": 2, "approved": 0, "rejected": 0, "superseded": 0}
    row = everything.json()["drafts"][0]
    assert (row["modalities"], row["patient_id"], row["study_version"], row["state"]) == ("CT", "QMNx85rKkkg", 1, "awaiting review")
    assert row["created_at"].startswith("2026-01-01T")

    assert ids(client.get("/api/drafts", params={"modality": "MR"})) == [mr]
    assert ids(client.get("/api/drafts", params={"modality": "ct"})) == [ct]  # any case
    assert ids(client.get("/api/drafts", params={"received_from": "2026-01-02"})) == [mr]
    assert ids(client.get("/api/drafts", params={"received_to": "2026-01-01"})) == [ct]
    assert ids(client.get("/api/drafts", params={"received_from": "2026-01-01", "received_to": "2026-01-04"})) == [ct, mr]
    assert ids(client.get("/api/drafts", params={"received_from": "2026-01-05"})) == []
    assert ids(client.get("/api/drafts", params={"q": "qmnx85"})) == [ct]  # patient ID, any case, substring
    assert ids(client.get("/api/drafts", params={"q": "no such patient"})) == []
    assert ids(client.get("/api/drafts", params={"limit": 1, "offset": 1})) == [mr]

    assert client.post(f"/api/drafts/{ct}/approve", json={}, headers=radiologist).status_code == 200
    approved = client.get("/api/drafts", params={"state": "approved"})
    assert ids(approved) == [ct] and approved.json()["drafts"][0]["state"] == "approved"
    assert approved.json()["counts"] == {"awaiting review": 1, "approved": 1, "rejected": 0, "superseded": 0}
    assert ids(client.get("/api/drafts", params={"state": "approved", "modality": "MR"})) == []
    counts = client.get("/api/drafts", params={"modality": "MR"}).json()["counts"]  # counts follow the other filters
    assert counts == {"awaiting review": 1, "approved": 0, "rejected": 0, "superseded": 0}
    assert client.get("/api/drafts", params={"state": "rejected"}).json()["drafts"] == []


@pytest.mark.parametrize(
    "params, status",
    [
        ({"modality": "C-T"}, 400),
        ({"q": "x" * 65}, 400),
        ({"received_from": "2026-01-05", "received_to": "2026-01-01"}, 400),
        ({"received_from": "yesterday"}, 422),
        ({"state": "pending"}, 422),
        ({"limit": 0}, 422),
        ({"limit": 1001}, 422),
        ({"offset": -1}, 422),
    ],
)
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_worklist_bad_filters(client, radiologist, params, status):
    response = client.get("/api/drafts", params=params)
    assert response.status_code == status, response.text
    assert response.json()["detail"]


@pytest.mark.peers
def test_draft_detail(client, radiologist, draft_id, db):
    detail = client.get(f"/api/drafts/{draft_id}")
    assert detail.status_code == 200
    d = detail.json()
    with db.session() as s:
        doc = s.get(SRDocument, draft_id)
    assert (d["draft_id"], d["sop_instance_uid"], d["state"], d["study_version"]) == (draft_id, doc.sop_instance_uid, "awaiting review", 1)
    assert d["status_banner"] == "AI draft - preliminary, not verified" and d["review"] is None
    assert set(d["model"]) == {"name", "version", "weights_sha256", "generation_preset"} and len(d["model"]["weights_sha256"]) == 64
    (series,) = d["series"]
    assert series["modality"] == "CT" and series["text"] and len(series["key_images"]) == 3
    assert d["impression"] == read_impression(pydicom.dcmread(doc.path))
    assert client.get("/api/drafts/999999").status_code == 404
    assert client.get("/api/drafts/not-a-number").status_code == 422


@pytest.mark.peers
def test_approve_with_edits_then_a_second_approval_is_a_conflict(client, radiologist, accounts, draft_id, db):
    series_uid = client.get(f"/api/drafts/{draft_id}").json()["series"][0]["series_uid"]
    body = {"findings": {series_uid: "  Small hypodensity in the left frontal lobe.  "}, "impression": "Possible small infarct."}
    approved = client.post(f"/api/drafts/{draft_id}/approve", json=body, headers=radiologist)
    assert approved.status_code == 200, approved.text
    uid = approved.json()["verified_sr"]
    with db.session() as s:
        verified = s.scalars(select(SRDocument).where(SRDocument.sop_instance_uid == uid)).one()
        review = s.scalars(select(Review)).one()
    sr = pydicom.dcmread(verified.path)
    assert [f.text for f in read_findings(sr)] == ["Small hypodensity in the left frontal lobe."]
    assert read_impression(sr) == "Possible small infarct." and (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "VERIFIED")
    assert review.edited and review.edit_distance > 0

    after = client.get(f"/api/drafts/{draft_id}").json()
    assert after["state"] == "approved" and after["review"]["verified_sr"] == uid and after["review"]["edited"] is True
    assert after["review"]["findings"][0]["final"] == "Small hypodensity in the left frontal lobe."

    again = client.post(f"/api/drafts/{draft_id}/approve", json={}, headers=radiologist)
    assert again.status_code == 409 and "already approved" in again.json()["detail"]
    sign_in(client, "jones")  # another radiologist, too late as well
    jones = {"X-CSRF-Token": client.get("/api/me").json()["csrf_token"]}
    assert client.post(f"/api/drafts/{draft_id}/approve", json={}, headers=jones).status_code == 409
    assert client.post(f"/api/drafts/{draft_id}/reject", json={"reason": "x"}, headers=jones).status_code == 409
    with db.session() as s:
        assert len(s.scalars(select(SRDocument).where(SRDocument.kind == "verified")).all()) == 1


@pytest.mark.peers
def test_reject_with_a_reason(client, radiologist, draft_id, db):
    rejected = client.post(f"/api/drafts/{draft_id}/reject", json={"reason": "Wrong body part described."}, headers=radiologist)
    assert rejected.status_code == 204 and rejected.content == b""
    detail = client.get(f"/api/drafts/{draft_id}").json()
    assert detail["state"] == "rejected" and detail["review"]["reason"] == "Wrong body part described."
    assert client.post(f"/api/drafts/{draft_id}/approve", json={}, headers=radiologist).status_code == 409
    with db.session() as s:
        event = s.scalars(select(AuditEvent).where(AuditEvent.action == "draft.rejected")).one()
        assert s.scalars(select(SRDocument).where(SRDocument.kind == "verified")).all() == []
    assert (event.actor, event.details["reason"]) == ("user:smith", "Wrong body part described.")


@pytest.mark.peers
def test_bad_input_is_refused_and_changes_nothing(client, radiologist, draft_id, db):
    series_uid = client.get(f"/api/drafts/{draft_id}").json()["series"][0]["series_uid"]
    cases = [
        ("approve", {"findings": {"1.2.3.4": "Text for a series not in the draft."}}, 400, "not in this draft"),
        ("approve", {"findings": {series_uid: "   "}}, 400, "must not be empty"),
        ("approve", {"impression": ""}, 400, "impression must not be empty"),
        ("approve", {"findings": ["not", "a", "mapping"]}, 422, None),
        ("reject", {"reason": "   "}, 400, "needs a reason"),
        ("reject", {"reason": ""}, 422, None),
        ("reject", {}, 422, None),
    ]
    for action, body, status, message in cases:
        response = client.post(f"/api/drafts/{draft_id}/{action}", json=body, headers=radiologist)
        assert response.status_code == status, (action, body, response.text)
        if message:
            assert message in response.json()["detail"], (action, body, response.text)
    not_json = client.post(f"/api/drafts/{draft_id}/approve", content=b"{", headers={**radiologist, "Content-Type": "application/json"})
    assert not_json.status_code == 422
    missing = client.post("/api/drafts/999999/approve", json={}, headers=radiologist)
    assert missing.status_code == 400 and "there is no draft 999999" in missing.json()["detail"]
    with db.session() as s:
        assert s.scalars(select(Review)).all() == [] and s.scalars(select(SRDocument).where(SRDocument.kind == "verified")).all() == []
    assert client.get(f"/api/drafts/{draft_id}").json()["state"] == "awaiting review"


@pytest.mark.peers
def test_posts_need_the_csrf_header(client, radiologist, draft_id, db):
    token = radiologist["X-CSRF-Token"]
    for headers in ({}, {"X-CSRF-Token": ""}, {"X-CSRF-Token": token[:-1]}, {"X-CSRF-Token": token + "x"}):
        for action, body in (("approve", {}), ("reject", {"reason": "No."})):
            response = client.post(f"/api/drafts/{draft_id}/{action}", json=body, headers=headers)
            assert response.status_code == 403 and response.json()["detail"] == "missing or wrong CSRF token", (headers, action)
    # The token of another session is no good either.
    other = clone_draft(db, draft_id)
    with TestClient(client.app, base_url="https://testserver", follow_redirects=False) as second:
        other_token = sign_in(second, "jones")
    assert other_token != token
    assert client.post(f"/api/drafts/{other}/approve", json={}, headers={"X-CSRF-Token": other_token}).status_code == 403
    with db.session() as s:
        assert s.scalars(select(Review)).all() == []
        denied = s.scalars(select(AuditEvent).where(AuditEvent.action == "auth.access_denied")).all()
    assert len(denied) == 9 and {e.actor for e in denied} == {"user:smith"}
    assert client.post(f"/api/drafts/{draft_id}/approve", json={}, headers={"X-CSRF-Token": token}).status_code == 200


@pytest.mark.peers
def test_an_admin_cannot_use_the_review_api(client, accounts, draft_id):
    csrf = sign_in(client, "root")
    assert client.get("/api/me").json()["role"] == "admin"
    assert client.get("/api/drafts").status_code == 403
    assert client.get(f"/api/drafts/{draft_id}").status_code == 403
    response = client.post(f"/api/drafts/{draft_id}/approve", json={}, headers={"X-CSRF-Token": csrf})
    assert response.status_code == 403 and response.json()["detail"] == "this needs the radiologist role"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_openapi_documents_the_api(client):
    schema = client.get("/api/openapi.json")
    assert schema.status_code == 200
    spec = schema.json()
    paths = spec["paths"]
    assert {"/api/me", "/api/drafts", "/api/drafts/{draft_id}", "/api/drafts/{draft_id}/approve", "/api/drafts/{draft_id}/reject"} <= set(
        paths
    )
    assert set(paths["/api/drafts"]) == {"get"} and set(paths["/api/drafts/{draft_id}/approve"]) == {"post"}
    params = {p["name"] for p in paths["/api/drafts"]["get"]["parameters"]}
    assert {"state", "modality", "received_from", "received_to", "q", "limit", "offset"} <= params
    approve = paths["/api/drafts/{draft_id}/approve"]["post"]
    assert approve["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/Approval")
    assert "X-CSRF-Token" in spec["components"]["schemas"]["Me"]["properties"]["csrf_token"]["description"]
    assert "204" in paths["/api/drafts/{draft_id}/reject"]["post"]["responses"]
    assert not any(p in paths for p in ("/login", "/worklist", "/drafts/{draft_id}"))  # the pages are not part of the API
