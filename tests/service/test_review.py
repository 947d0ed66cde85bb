"""Review decisions on real draft SRs (made by the drafting step from received images): verified SRs,
conflicts between two radiologists, superseded drafts; both database backends."""

from __future__ import annotations

import subprocess
import threading

import pydicom
import pytest
from sqlalchemy import select

from dicom_io.sr import read_findings, read_impression
from service.review import ReviewConflict, ReviewError, Reviews, ReviewState, edit_distance
from service.schema import AuditEvent, Dispatch, Output, Review, SRDocument
from service.users import Users
from tests.conftest import series_files, storescu


@pytest.fixture
def reviews(db, clock, settings) -> Reviews:
    return Reviews(db, clock, storage=settings.storage, destinations=["ORTHANC@127.0.0.1:4242"], organization="General Hospital")


@pytest.fixture
def radiologists(db, clock):
    users = Users(db, clock)
    return [users.add(name, f"{name.title()}^Jane", "radiologist", "correct horse battery", "cli:test") for name in ("smith", "jones")]


@pytest.mark.peers
def test_approving_as_is_writes_a_verified_sr_that_supersedes_the_draft(db, reviews, radiologists, draft_id):
    view = reviews.view(draft_id)
    assert view.state is ReviewState.AWAITING and view.model_name and len(view.series) == 1
    uid = reviews.approve(draft_id, radiologists[0], address="10.0.0.7")
    with db.session() as s:
        draft, verified = s.get(SRDocument, draft_id), s.scalars(select(SRDocument).where(SRDocument.sop_instance_uid == uid)).one()
        review = s.scalars(select(Review)).one()
        dispatch = s.scalars(select(Dispatch)).one()
        output = s.get(Output, dispatch.output_id)
        event = s.scalars(select(AuditEvent).where(AuditEvent.action == "draft.approved")).one()
    sr = pydicom.dcmread(verified.path)
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == ("COMPLETE", "VERIFIED", "FINAL")
    assert sr.SOPInstanceUID != draft.sop_instance_uid and verified.predecessor_id == draft_id
    predecessor = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == draft.sop_instance_uid
    assert str(sr.VerifyingObserverSequence[0].VerifyingObserverName) == "Smith^Jane"
    assert sr.VerifyingObserverSequence[0].VerifyingOrganization == "General Hospital"
    assert [f.text for f in read_findings(sr)] == [view.series[0]["text"]]
    assert (review.decision, review.edited, review.edit_distance) == ("approved", False, 0)
    assert (output.report_id, output.kind, output.path, dispatch.status) == (verified.id, "dicom-sr", verified.path, "pending")
    assert (event.actor, event.details["address"], event.details["verified_sr"]) == ("user:smith", "10.0.0.7", uid)
    assert reviews.view(draft_id).state is ReviewState.APPROVED
    check = subprocess.run(["dciodvfy", "-new", verified.path], capture_output=True, text=True)
    assert " Error " not in check.stdout + check.stderr, check.stderr


@pytest.mark.peers
def test_approving_an_edited_draft_records_the_edit(db, reviews, radiologists, draft_id):
    view = reviews.view(draft_id)
    series_uid = view.series[0]["series_uid"]
    with pytest.raises(ReviewError, match="not in this draft"):
        reviews.approve(draft_id, radiologists[1], findings={"1.2.3": "x"})
    with pytest.raises(ReviewError, match="must not be empty"):
        reviews.approve(draft_id, radiologists[1], findings={series_uid: "  "})
    uid = reviews.approve(
        draft_id, radiologists[0], findings={series_uid: "No acute intracranial abnormality."}, impression="Normal head CT."
    )
    with db.session() as s:
        review = s.scalars(select(Review)).one()
        verified = s.scalars(select(SRDocument).where(SRDocument.sop_instance_uid == uid)).one()
        sr = pydicom.dcmread(verified.path)
    assert [f.text for f in read_findings(sr)] == ["No acute intracranial abnormality."] and read_impression(sr) == "Normal head CT."
    assert verified.impression == "Normal head CT."  # kept beside the file, as the draft's is
    assert review.edited and review.edit_distance > 0
    assert review.findings == [{"series_uid": series_uid, "draft": view.series[0]["text"], "final": "No acute intracranial abnormality."}]


@pytest.mark.peers
def test_two_radiologists_approving_at_once_make_one_sr_and_one_conflict(db, reviews, radiologists, draft_id, settings):
    outcomes: list[object] = []
    barrier = threading.Barrier(2)

    def approve(account) -> None:
        barrier.wait()
        try:
            outcomes.append(reviews.approve(draft_id, account))
        except ReviewConflict as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=approve, args=(a,)) for a in radiologists]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(type(o).__name__ for o in outcomes) == ["ReviewConflict", "str"]
    with db.session() as s:
        assert len(s.scalars(select(SRDocument).where(SRDocument.kind == "verified")).all()) == 1
        assert len(s.scalars(select(Review)).all()) == 1
    files = {p.name for p in settings.storage.reports_dir.rglob("*.dcm")}
    assert len(files) == 2, "the draft and one verified SR; the loser's file is removed"
    with pytest.raises(ReviewConflict, match="already approved"):
        reviews.reject(draft_id, radiologists[1], "too late")


@pytest.mark.peers
def test_a_superseded_draft_cannot_be_approved_but_can_be_rejected(
    db, reviews, radiologists, draft_id, listener, clock, assembler, settings
):
    # Two more slices of the study arrive late: version 2, with a draft of its own to come.
    assert storescu(listener, series_files("ct-head-ge")[8:10]).returncode == 0
    clock.advance(settings.quiet_seconds + 1)
    assert assembler.tick()
    assert reviews.view(draft_id).state is ReviewState.SUPERSEDED
    with pytest.raises(ReviewError, match="superseded"):
        reviews.approve(draft_id, radiologists[0])
    with pytest.raises(ReviewError, match="needs a reason"):
        reviews.reject(draft_id, radiologists[0], "  ")
    reviews.reject(draft_id, radiologists[0], "superseded by the complete study")
    assert reviews.view(draft_id).state is ReviewState.REJECTED


@pytest.mark.peers
def test_admins_do_not_sign_reports(db, clock, reviews, draft_id):
    admin = Users(db, clock).add("root", "Admin^Ann", "admin", "correct horse battery", "cli:test")
    with pytest.raises(ReviewError, match="only radiologists"):
        reviews.approve(draft_id, admin)


@pytest.mark.parametrize(
    ("a", "b", "distance"), [("", "", 0), ("abc", "abc", 0), ("kitten", "sitting", 3), ("", "abc", 3), ("flaw", "lawn", 2)]
)
def test_edit_distance(a, b, distance):
    assert edit_distance(a, b) == distance == edit_distance(b, a)
