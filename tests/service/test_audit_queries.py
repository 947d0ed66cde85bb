"""The admins' questions (service/audit_queries.py) on real work, both backends: studies received by the
listener, drafts written by the drafting step, approvals as is and edited through service.review, a
job that fails in the job runner, a dispatch the PACS side refuses. The clock is manual, so every
duration is exact."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from service import audit
from service import audit_queries as aq
from service.audit import Action
from service.outputs import DicomSR, OutputKinds
from service.review import Reviews, edit_distance
from service.schema import Dispatch, Output, SRDocument, Study
from service.users import Users
from tests.conftest import series_files, storescu
from tests.migrations.audit_data import populate
from tests.pipeline import MR, make_drafter, runner
from tests.processes import run, settings_env
from workers.dispatching import DispatchRunner
from workers.drafting import PermanentJobError

DESTINATION = "PACS@127.0.0.1:11112"


@pytest.fixture
def reviews(db, clock, settings) -> Reviews:
    return Reviews(db, clock, storage=settings.storage, destinations=[DESTINATION], organization="General Hospital")


@pytest.fixture
def smith(db, clock):
    users = Users(db, clock)
    users.add("jones", "Jones^Tom", "radiologist", "correct horse battery", "cli:test")
    return users.add("smith", "Smith^Jane", "radiologist", "correct horse battery", "cli:test")


def ct_study(db, draft_id: int) -> Study:
    with db.session() as s:
        return s.scalars(select(Study).join(SRDocument, SRDocument.study_id == Study.id).where(SRDocument.id == draft_id)).one()


def refuse(destination: str) -> object:
    raise ValueError(f"{destination}: no such host")


@pytest.mark.peers
def test_turnaround_quality_and_failed_work_of_real_reviews(db, clock, settings, listener, assembler, captioner, draft_id, reviews, smith):
    # The CT study was received at t, drafted at t + 31 s (quiet period 30 s); approved as drafted 600 s later.
    ct = ct_study(db, draft_id)
    clock.advance(600)
    reviews.approve(draft_id, smith)
    # An MR study: received, drafted 31 s later, approved 1200 s after that with both texts edited.
    assert storescu(listener, MR).returncode == 0
    clock.advance(settings.quiet_seconds + 1)
    (mr_job,) = assembler.tick()
    assert runner(db, clock).run(mr_job, make_drafter(db, clock, captioner, settings, destinations=()).draft) == "succeeded"
    with db.session() as s:
        mr_draft = s.scalar(select(SRDocument.id).where(SRDocument.job_id == mr_job))
    view = reviews.view(mr_draft)
    finding, impression = "No acute intracranial abnormality.", "Normal MR of the brain."
    expected_distance = edit_distance(view.series[0]["text"], finding) + edit_distance(view.impression, impression)
    draft_length = len(view.series[0]["text"]) + len(view.impression)
    assert expected_distance > 0
    clock.advance(1200)
    reviews.approve(mr_draft, smith, findings={view.series[0]["series_uid"]: finding}, impression=impression)
    # Two late CT slices make version 2 of the CT study, whose job fails for good.
    assert storescu(listener, series_files("ct-head-ge")[8:10]).returncode == 0
    clock.advance(settings.quiet_seconds + 1)
    (ct_job_2,) = assembler.tick()

    def unreadable(job_id: int) -> str:
        raise PermanentJobError("unreadable pixel data")

    assert runner(db, clock).run(ct_job_2, unreadable) == "failed"
    # A minute later, the CT's verified SR cannot be delivered.
    clock.advance(60)
    with db.session() as s:
        verified = s.scalars(select(SRDocument).where(SRDocument.predecessor_id == draft_id)).one()
        dispatch_id = s.scalar(select(Dispatch.id).join(Output).where(Output.report_id == verified.id))
    sender = DispatchRunner(
        db,
        clock,
        "worker:test",
        kinds=OutputKinds([DicomSR(refuse, lambda d, paths: pytest.fail("must not send"))]),
        max_attempts=1,
        retry_delay=lambda n: 1.0,
        stale_seconds=60,
    )
    assert sender.run(dispatch_id) == "failed"

    model = view.model_name, view.model_version, view.weights_sha256
    (stats,) = aq.turnaround_by_model(db)
    assert (stats.model_name, stats.model_version, stats.weights_sha256, stats.studies, stats.approved) == (*model, 2, 2)
    assert (stats.draft_median_seconds, stats.draft_p90_seconds) == (31, 31)
    assert (stats.approval_median_seconds, stats.approval_p90_seconds) == (600, 1200)
    assert (stats.total_median_seconds, stats.total_p90_seconds) == (631, 1231)
    studies = aq.study_turnaround(db)
    assert [(s.study_uid, s.study_version, s.total_seconds) for s in studies][1] == (ct.study_uid, 1, 631), "v2 has no draft: v1's counts"
    assert studies[0].approval_seconds == 1200 and studies[0].received_at > studies[1].received_at
    assert aq.turnaround_by_model(db, since=studies[0].received_at)[0].studies == 1

    (quality,) = aq.model_quality(db)
    assert (quality.drafts, quality.reviewed, quality.approved, quality.approved_unchanged, quality.rejected) == (2, 2, 2, 1, 0)
    assert quality.approved_unchanged_rate == 0.5
    assert quality.mean_edit_distance == pytest.approx(expected_distance / 2)
    assert quality.median_edit_distance == 0, "nearest rank: the lower of 0 and the MR's distance"
    assert quality.normalised_edit_distance == pytest.approx(expected_distance / draft_length / 2)

    failed = aq.failed_work(db)
    assert [(f.kind, f.job_id if f.kind == "job" else f.sr_uid, f.study_uid, f.study_version) for f in failed] == [
        ("dispatch", verified.sop_instance_uid, ct.study_uid, 1),
        ("job", ct_job_2, ct.study_uid, 2),
    ], "the latest failure first"
    assert failed[1].error == "unreadable pixel data" and failed[0].destination == DESTINATION and failed[0].sr_kind == "verified"
    assert "no such host" in (failed[0].error or "") and failed[0].failed_at == failed[1].failed_at + timedelta(seconds=60)
    assert aq.sr_destinations(db, verified.sop_instance_uid) == [DESTINATION]

    counts = aq.overview(db, clock.now())
    assert counts.as_dict() == {
        "studies": 2,
        "draft_srs": 2,
        "undecided_drafts": 0,
        "approved": 2,
        "rejected": 0,
        "failed_jobs": 1,
        "failed_dispatches": 1,
        "active_users": 2,
        "events_last_24h": counts.events_last_24h,
    }
    assert counts.events_last_24h > 20
    assert aq.overview(db, clock.now() + timedelta(days=2)).events_last_24h == 0


@pytest.mark.peers
def test_searching_the_audit_trail(db, clock, draft_id, reviews, smith):
    study = ct_study(db, draft_id)
    with db.session() as s:  # the RIS filled in the accession number later (the test images have none)
        s.execute(update(Study).where(Study.id == study.id).values(accession_number="ACC42"))
    received = study.first_received_at
    clock.advance(600)
    reviews.approve(draft_id, smith, address="10.0.0.7")
    with db.session() as s:
        audit.record(s, clock.now(), "dicom:=EVIL@10.9.9.9", Action.ASSOCIATION_REJECTED, "association", "=1+2")

    everything = aq.search_audit(db, aq.AuditSearch(limit=1000)).rows
    assert [(r.at, r.id) for r in everything] == sorted(((r.at, r.id) for r in everything), reverse=True), "newest first"
    by_study = aq.search_audit(db, aq.AuditSearch(study_uid=study.study_uid, limit=1000)).rows
    assert {r.study_uid for r in by_study} == {study.study_uid}
    assert {"study.receiving", "study.version_created", "job.created", "job.started", "sr.written", "draft.approved"} <= {
        r.action for r in by_study
    }
    assert {r.accession_number for r in by_study} == {"ACC42"} and {r.patient_id for r in by_study} == {study.patient_id}
    assert len(by_study) < len(everything)
    assert aq.search_audit(db, aq.AuditSearch(accession="ACC42", limit=1000)).rows == by_study
    assert aq.search_audit(db, aq.AuditSearch(patient=study.patient_id, limit=1000)).rows == by_study
    assert aq.search_audit(db, aq.AuditSearch(patient=f"  {study.patient_name.lower()} ", limit=1000)).rows == by_study
    assert aq.search_audit(db, aq.AuditSearch(patient="nobody of that name")).rows == []
    assert aq.search_audit(db, aq.AuditSearch(accession="ACC4")).rows == [], "accession numbers match exactly"

    (approval,) = aq.search_audit(db, aq.AuditSearch(user="smith", action="draft.approved")).rows
    assert (approval.actor, approval.study_uid, approval.details["address"], approval.details["edited"]) == (
        "user:smith",
        study.study_uid,
        "10.0.0.7",
        False,
    )
    smiths = aq.search_audit(db, aq.AuditSearch(user="user:smith")).rows
    assert approval in smiths and smiths == aq.search_audit(db, aq.AuditSearch(user="smith")).rows
    assert {r.action for r in smiths} == {"draft.approved", "output.built", "dispatch.queued"}
    jobs = aq.search_audit(db, aq.AuditSearch(action="job.", limit=1000)).rows
    assert jobs and {r.action.split(".")[0] for r in jobs} == {"job"}
    assert {r.actor for r in aq.search_audit(db, aq.AuditSearch(user="worker:test", limit=1000)).rows} == {"worker:test"}

    later = aq.search_audit(db, aq.AuditSearch(since=received + timedelta(seconds=1), limit=1000)).rows
    assert later and all(r.at >= received + timedelta(seconds=1) for r in later) and len(later) < len(everything)
    before = aq.search_audit(db, aq.AuditSearch(until=received + timedelta(seconds=1), limit=1000)).rows
    assert len(before) + len(later) == len(everything)

    first, second = aq.search_audit(db, aq.AuditSearch(limit=2)), aq.search_audit(db, aq.AuditSearch(limit=2, offset=2))
    assert first.more and [r.id for r in first.rows + second.rows] == [r.id for r in everything[:4]]
    assert not aq.search_audit(db, aq.AuditSearch(limit=1000)).more

    table = list(csv.reader(io.StringIO(aq.audit_csv(everything[:2]))))
    assert table[0] == aq.AUDIT_CSV_COLUMNS and len(table) == 3
    assert (table[1][2], table[1][5]) == ("dicom:=EVIL@10.9.9.9", "'=1+2"), "no formulas for spreadsheets"
    every = list(csv.reader(io.StringIO(aq.audit_csv(everything))))
    assert {row[3] for row in every[1:]} == {r.action for r in everything}
    assert not any(cell and cell[0] in "=+-@" for row in every[1:] for cell in row), "every export neutralises formulas"

    # The export (COPY on PostgreSQL, Python on SQLite) holds the same cells as the rows it says it holds.
    def parsed(chunks: list[str]) -> list[list[object]]:
        table = list(csv.reader(io.StringIO("".join(chunks))))
        return [table[0], *[[*row[:10], json.loads(row[10])] for row in table[1:]]]

    export = aq.export_audit(db, aq.AuditSearch(limit=1000))
    assert (export.rows, export.more) == (len(everything), False)
    assert parsed(export.chunks) == parsed(list(aq.iter_audit_csv(everything)))
    assert ["dicom:=EVIL@10.9.9.9", "'=1+2"] in [[row[2], row[5]] for row in parsed(export.chunks)[1:]]
    assert len(jobs) >= 4
    two = aq.export_audit(db, aq.AuditSearch(limit=2, offset=2, action="job."))
    assert (two.rows, two.more) == (2, len(jobs) > 4)
    assert [int(row[0]) for row in parsed(two.chunks)[1:]] == [r.id for r in jobs[2:4]]
    assert (lambda one: (one.rows, one.more))(aq.export_audit(db, aq.AuditSearch(limit=1, action="job."))) == (1, True)


def test_bad_searches_are_refused():
    with pytest.raises(aq.QueryError, match="before until"):
        aq.AuditSearch(since=datetime(2026, 2, 1, tzinfo=UTC), until=datetime(2026, 1, 1, tzinfo=UTC))
    with pytest.raises(aq.QueryError, match="time zone"):
        aq.AuditSearch(since=datetime(2026, 2, 1))
    with pytest.raises(aq.QueryError, match="limit"):
        aq.AuditSearch(limit=0)
    with pytest.raises(aq.QueryError, match="not a date"):
        aq.parse_time("yesterday")
    assert aq.parse_time("2026-03-01", end=True) == datetime(2026, 3, 2, tzinfo=UTC)
    assert aq.parse_time("2026-03-01T10:00+01:00") == datetime(2026, 3, 1, 9, tzinfo=UTC)
    assert aq.parse_time("2026-03-01T10:00") == datetime(2026, 3, 1, 10, tzinfo=UTC)


@pytest.mark.processes
def test_medcap_audit_commands(db, settings):
    populate(db)  # a known history: two model versions, a failed job and a failed dispatch
    env = settings_env(settings)
    search = run(["audit", "search", "--patient", "doe jane", "--action", "draft.", "--csv"], env)
    assert search.returncode == 0, search.stderr
    table = list(csv.reader(io.StringIO(search.stdout)))
    assert table[0] == aq.AUDIT_CSV_COLUMNS
    assert [(r[3], r[7]) for r in table[1:]] == [("draft.rejected", "A1003"), ("draft.approved", "A1001")]
    listed = run(["audit", "search", "--user", "jones", "--until", "2026-01-05"], env)
    assert listed.returncode == 0 and listed.stdout.splitlines()[0].startswith("AT (UTC)") and len(listed.stdout.splitlines()) == 3
    (exported,) = aq.search_audit(db, aq.AuditSearch(action="audit.exported")).rows
    assert exported.actor.startswith("cli:") and exported.details["filters"] == {"patient": "doe jane", "action": "draft."}
    assert aq.search_audit(db, aq.AuditSearch(action="audit.searched")).rows[0].details["shown"] == 2

    turnaround = run(["audit", "turnaround", "--csv"], env)
    assert list(csv.DictReader(io.StringIO(turnaround.stdout)))[0] | {} == {
        "model_name": "msmedcap",
        "model_version": "1.0",
        "weights_sha256": "a" * 64,
        "studies": "3",
        "approved": "2",
        "draft_median_seconds": "120.0",
        "draft_p90_seconds": "180.0",
        "approval_median_seconds": "600.0",
        "approval_p90_seconds": "1200.0",
        "total_median_seconds": "660.0",
        "total_p90_seconds": "1320.0",
    }
    assert "2.0 min" in run(["audit", "turnaround"], env).stdout
    quality = run(["audit", "quality", "--since", "2026-01-05T08:36"], env)  # from A1003's draft (rejected) on
    lines = quality.stdout.splitlines()
    assert lines[0].split()[:4] == ["MODEL", "VERSION", "WEIGHTS", "DRAFTS"] and len(lines) == 3
    assert lines[1].split()[3:9] == ["2", "1", "0", "0", "1", "0.0"], "model 1.0: A1003 rejected, A1004's first draft undecided"
    failed = run(["audit", "failed"], env).stdout
    assert "PermanentJobError: unreadable pixel data" in failed and "PACS@10.0.0.9:104" in failed and "medcap retry" in failed
    bad = run(["audit", "search", "--since", "tomorrow"], env)
    assert bad.returncode == 1 and "is not a date" in bad.stderr
