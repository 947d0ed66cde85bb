"""The review page for reading (issue 15), over HTTP on the real database with real DICOM: the stack viewer's
slice list and server-side renders, the reading order that moves on after each decision, the header
facts, the draft/final diff, the patient's earlier reports, and worklist errors in the user's words."""

from __future__ import annotations

import html
import io
import re

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select, update

from dicom_io.sample_study import write_sample
from service.schema import Draft, Study
from service.web import stack as stack_module
from tests.pipeline import CT, MR, draft_study
from tests.service.web.conftest import sign_in
from tests.service.web.test_authorization import clone_draft

pytestmark = pytest.mark.peers


def csrf_of(page: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]


def png(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png" and "private" in response.headers["cache-control"]
    return np.asarray(Image.open(io.BytesIO(response.content)))


def test_the_stack_has_every_slice_its_key_images_and_renders_any_window(client, accounts, draft_id, db):
    sign_in(client, "smith")
    with db.session() as s:
        draft = s.scalars(select(Draft).where(Draft.sr_document_id == draft_id)).one()
    base = f"/drafts/{draft_id}/series/{draft.series_uid}"
    stack_module.rendered_slice.cache_clear()
    stack = client.get(f"{base}/stack.json").json()
    assert stack_module.rendered_slice.cache_info().currsize == 0  # opening the stack renders nothing
    assert stack["count"] == len(CT) == len(stack["slices"]) and stack["modality"] == "CT"
    positions = [s["position"] for s in stack["slices"]]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)  # stack order along the normal
    by_uid = {s["sop_instance_uid"]: i for i, s in enumerate(stack["slices"])}
    assert [k["index"] for k in stack["keys"]] == [by_uid[k["sop_instance_uid"]] for k in draft.key_images]
    assert list(stack["windows"]) == ["default", "brain", "subdural", "stroke", "bone", "soft_tissue", "lung"]
    assert stack["windows"]["brain"] == [40, 80] and stack["windows"]["default"] == [40, 80]  # a head CT reads in the brain window

    middle = len(CT) // 2
    brain = png(client.get(f"{base}/slices/{middle}.png", params={"c": 40, "w": 80}))
    bone = png(client.get(f"{base}/slices/{middle}.png", params={"c": 400, "w": 1800}))
    assert brain.shape == bone.shape == (512, 512) and brain.dtype == np.uint8
    # Brain tissue (~30-40 HU) is mid-grey in the brain window and near black in the bone window.
    assert brain.mean() > bone.mean() + 10 and (brain == 255).mean() > (bone == 255).mean()
    other = png(client.get(f"{base}/slices/{middle + 1}.png", params={"c": 40, "w": 80}))
    assert not np.array_equal(brain, other)
    assert np.array_equal(png(client.get(f"{base}/slices/{middle}.png", params={"c": 40.01, "w": 80})), brain)
    info = stack_module.rendered_slice.cache_info()
    assert (info.currsize, info.hits) == (3, 1)  # only what was viewed was rendered, and a repeat (same window to 0.1) is cached

    refused = client.get(f"{base}/slices/{len(CT)}.png", params={"c": 40, "w": 80})
    assert refused.status_code == 404 and f"the series has {len(CT)} slices" in refused.text
    for params in ({"c": 40, "w": 0}, {"c": "nan", "w": 80}):
        bad = client.get(f"{base}/slices/0.png", params=params)
        assert bad.status_code == 400 and "finite center and a width above 0" in bad.text
    elsewhere = client.get(f"/drafts/{draft_id}/series/1.2.3.4/stack.json")
    assert elsewhere.status_code == 404 and "not part of the draft's study" in elsewhere.json()["detail"]


def test_the_review_page_shows_what_the_study_is_its_header_and_the_keyboard(client, accounts, draft_id, db):
    sign_in(client, "smith")
    with db.session() as s:
        s.execute(update(Study).values(study_description="CT HEAD WITHOUT CONTRAST", accession_number="ACC42"))
        study_uid = s.scalar(select(Study.study_uid))
    page = client.get(f"/drafts/{draft_id}").text
    title = re.search(r"<title>(.*?)</title>", page).group(1)
    assert title == "CT HEAD WITHOUT CONTRAST · ACC42 · MedCap" and study_uid not in title
    facts = dict(re.findall(r"<dt>(\w+)</dt><dd>([^<]*)</dd>", page.split('class="facts series-facts"')[1]))
    assert facts == {"Modality": "CT", "Region": "head", "Plane": "axial, 4 mm slices", "Contrast": "not stated"}
    assert 'data-stack="/drafts/' in page and '<script src="/static/viewer.js" defer></script>' in page
    assert "<kbd>a</kbd>" in page and 'id="keys"' in page  # the keys are documented on the page
    assert "None: this is the first study of QMNx85rKkkg" in page
    assert client.get("/static/viewer.js").status_code == 200 and client.get("/static/review.js").status_code == 200


def test_the_reading_order_opens_the_oldest_draft_and_moves_on_after_each_decision(client, accounts, draft_id, db):
    second, third = clone_draft(db, draft_id), clone_draft(db, draft_id)
    sign_in(client, "smith")
    start = client.get("/worklist/next")
    assert (start.status_code, start.headers["location"]) == (303, f"/drafts/{draft_id}")
    page = client.get(f"/drafts/{draft_id}").text
    assert f'href="/drafts/{second}" id="next-draft"' in page and "previous-draft" not in page
    middle = client.get(f"/drafts/{second}").text
    assert f'href="/drafts/{draft_id}" id="previous-draft"' in middle and f'href="/drafts/{third}" id="next-draft"' in middle

    approved = client.post(f"/drafts/{draft_id}/approve", data={"csrf_token": csrf_of(page), "impression": "Normal."})
    assert approved.status_code == 303 and approved.headers["location"].startswith(
        f"/drafts/{second}?message=Approved%20draft%20{draft_id}"
    )
    rejected = client.post(f"/drafts/{second}/reject", data={"csrf_token": csrf_of(page), "reason": "Wrong series."})
    assert rejected.headers["location"].startswith(f"/drafts/{third}?message=Rejected%20draft%20{second}")
    last = client.post(f"/drafts/{third}/reject", data={"csrf_token": csrf_of(page), "reason": "Motion."})
    assert last.headers["location"].startswith(f"/drafts/{third}?message=") and "No%20more%20drafts" in last.headers["location"]
    done = client.get("/worklist/next")
    assert done.headers["location"] == "/worklist?message=No%20drafts%20await%20review."
    assert "No drafts await review." in client.get(done.headers["location"]).text


def test_an_approved_report_shows_the_final_diff(client, accounts, draft_id, db):
    sign_in(client, "smith")
    page = client.get(f"/drafts/{draft_id}").text
    series_field = re.search(r'name="(finding:[0-9.]+)"', page).group(1)
    drafted = html.unescape(re.search(r'data-draft="([^"]*)"', page).group(1))
    assert "Unchanged from the draft." in page  # the live diff's starting point (review.js keeps it current)
    client.post(
        f"/drafts/{draft_id}/approve",
        data={"csrf_token": csrf_of(page), series_field: "No acute haemorrhage.", "impression": "Normal study."},
    )
    after = client.get(f"/drafts/{draft_id}").text
    diffs = re.findall(r'<p class="diff final-diff"[^>]*>(.*?)</p>', after, re.S)
    assert len(diffs) == 2 and all("<ins>" in d for d in diffs)

    def side(diff: str, keep: str, drop: str) -> str:
        return html.unescape(re.sub(rf"</?{keep}>", "", re.sub(rf"<{drop}>.*?</{drop}>", "", diff, flags=re.S)))

    # The diff holds both texts: the draft without the insertions, the final text without the deletions.
    assert side(diffs[0], "del", "ins") == drafted and side(diffs[0], "ins", "del") == "No acute haemorrhage."
    assert side(diffs[1], "ins", "del") == "Normal study."
    assert "live-diff" not in after  # decided: nothing left to edit


def test_the_patients_earlier_reports_newest_first_with_their_state(
    client, accounts, draft_id, db, clock, settings, listener, assembler, captioner
):
    clock.advance(86400)
    mr = draft_study(db, clock, settings, listener, assembler, captioner, MR)
    with db.session() as s:  # the MR study becomes the same patient's later study
        s.execute(update(Study).values(patient_id="PAT-1", patient_name="Doe^Jane"))
    csrf = sign_in(client, "smith")
    client.post(f"/drafts/{draft_id}/reject", data={"csrf_token": csrf, "reason": "Motion."})
    page = client.get(f"/drafts/{mr}").text
    earlier = re.search(r'<table id="earlier-reports">(.*?)</table>', page, re.S).group(1)
    assert re.findall(r'href="/drafts/(\d+)"', earlier) == [str(draft_id)]
    assert "rejected" in earlier and "CT" in earlier
    back = client.get(f"/drafts/{draft_id}").text
    assert re.findall(r'href="/drafts/(\d+)"', back.split('id="earlier-reports"')[1].split("</table>")[0]) == [str(mr)]


@pytest.mark.parametrize(
    "query, words",
    [
        ("state=bogus", "There is no state &#39;bogus&#39;. Choose one of: awaiting review, approved, rejected, superseded, all."),
        ("received_from=2026-13-01", "From &#39;2026-13-01&#39; is not a date: write it as YYYY-MM-DD"),
        ("received_from=2026-02-01&received_to=2026-01-01", "The From date is after the To date."),
        ("modality=C-T", "&#39;C-T&#39; is not a modality: use a DICOM code such as CT or MR."),
        ("sort=age", "There is no order &#39;age&#39;."),
    ],
)
def test_worklist_errors_speak_the_users_words(client, accounts, query, words):
    sign_in(client, "smith")
    response = client.get(f"/worklist?{query}")
    assert response.status_code == 400 and words in response.text and "ReviewState" not in response.text


def test_worklist_all_states_sorting_and_columns(client, accounts, draft_id, db, clock):
    with db.session() as s:
        s.execute(update(Study).values(study_description="CT HEAD", study_date="20250102"))
    sign_in(client, "smith")
    clock.advance(3 * 3600 + 120)
    everything = client.get("/worklist?state=all")
    assert everything.status_code == 200 and f'href="/drafts/{draft_id}"' in everything.text
    row = re.search(r"<tbody>(.*?)</tbody>", everything.text, re.S).group(1)
    assert ">3 h 2 min<" in row and "CT HEAD" in row and "2025-01-02" in row and "HEAD" in row
    for sort in ("waiting", "newest", "study_date", "patient"):
        assert f'href="/drafts/{draft_id}"' in client.get(f"/worklist?state=all&sort={sort}").text
    assert 'href="/worklist/next" id="start-reading"' in everything.text


def test_the_sample_fills_the_worklist_columns_and_sorts_first_by_priority(
    client, accounts, draft_id, db, clock, settings, listener, assembler, captioner, tmp_path
):
    """The `medcap sample` CT (STAT, with a clinical question) drafted after the shared CT (no request attributes)."""
    clock.advance(3600)
    sample = write_sample(tmp_path / "sample")
    stat = draft_study(db, clock, settings, listener, assembler, captioner, sample["ct-head"])
    sign_in(client, "smith")

    def order(query: str) -> list[int]:
        page = client.get(f"/worklist?{query}")
        assert page.status_code == 200, page.text
        return [int(i) for i in re.findall(r'href="/drafts/(\d+)" class="open-draft"', page.text)]

    assert order("") == [draft_id, stat]  # longest waiting first
    assert order("sort=priority") == [stat, draft_id]
    assert order("sort=newest") == [stat, draft_id]
    assert order("region=head") == [draft_id, stat] and order("region=CHEST") == []
    row = re.search(rf'<tr>\s*<td><a href="/drafts/{stat}".*?</tr>', client.get("/worklist").text, re.S).group(0)
    cells = [re.sub(r"<[^>]+>", " ", c).split() for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
    assert cells[1] == ["STAT"] and cells[3] == ["HEAD"]
    assert " ".join(cells[2]).startswith("CT HEAD WITHOUT CONTRAST (synthetic phantom) 2026-01-02 SAMPLE-CT")
    assert " ".join(cells[4]) == "Sample^Phantom MEDCAP-SAMPLE · 56 y O"
    assert " ".join(cells[5]) == "Sudden severe headache; rule out haemorrhage"
    page = client.get(f"/drafts/{stat}").text
    assert "<title>CT HEAD WITHOUT CONTRAST (synthetic phantom) · SAMPLE-CT · MedCap</title>" in page
    assert 'id="clinical-question">Sudden severe headache; rule out haemorrhage<' in page


def test_a_link_to_the_sites_own_viewer_when_one_is_configured(db, clock, make_settings, accounts, draft_id, client):
    from fastapi.testclient import TestClient

    from service.web.app import create_app

    sign_in(client, "smith")
    assert 'id="site-viewer"' not in client.get(f"/drafts/{draft_id}").text  # none by default
    with db.session() as s:
        s.execute(update(Study).values(accession_number="A&B 1"))
        study_uid = s.scalar(select(Study.study_uid))
    settings = make_settings(viewer_url_template="https://pacs.example/ohif/viewer?StudyInstanceUIDs={study_uid}&acc={accession_number}")
    with TestClient(create_app(settings, db, clock), base_url="https://testserver", follow_redirects=False) as other:
        sign_in(other, "smith")
        page = other.get(f"/drafts/{draft_id}").text
    link = html.unescape(re.search(r'<a href="([^"]+)" id="site-viewer"', page).group(1))
    assert link == f"https://pacs.example/ohif/viewer?StudyInstanceUIDs={study_uid}&acc=A%26B%201"
