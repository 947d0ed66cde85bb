"""Migration 0008 (draft_outcomes): the rebuilt views give exactly what 0004's definitions give on the
same data, the upgrade backfills a database written before it, and the downgrade restores 0004's views."""

from __future__ import annotations

import random
import re
import threading
from datetime import datetime, timedelta
from types import ModuleType
from typing import Any

import pytest
from sqlalchemy import inspect, text

import migrations
from service import audit_queries as aq
from service import draft_outcomes
from service.schema import Draft, Job, Review, SRDocument, Study, StudyVersion, User
from tests.migrations.audit_data import T0, populate

MIGRATION: ModuleType = migrations.revision_module("0008")
PREVIOUS: str = MIGRATION.down_revision
REBUILT = MIGRATION.REBUILT


def exact(value: Any) -> Any:
    """A float to 12 significant digits: an average's last bits depend on the order the rows are summed in."""
    return float(f"{value:.12g}") if isinstance(value, float) else value


def snapshot(db: Any, prefix: str = "") -> dict[str, list[tuple[Any, ...]]]:
    """Every row of each rebuilt view, sorted (the views have no order)."""
    with db.engine.connect() as conn:
        return {
            name: sorted((tuple(exact(v) for v in r) for r in conn.execute(text(f"SELECT * FROM {prefix}{name}"))), key=repr)
            for name in REBUILT
        }


def stats(rows: list[Any]) -> list[tuple[Any, ...]]:
    return [tuple(exact(v) for v in row.as_dict().values()) for row in rows]


def create_old_views(db: Any) -> None:
    """0004's definitions beside the new ones, as old_v_* (reading each other)."""
    dialect = db.engine.dialect.name
    old = MIGRATION._audit_views().views(dialect)
    with db.engine.begin() as conn:
        for name in REBUILT:
            sql = re.sub(r"\bv_(drafts|turnaround)\b", r"old_v_\1", old[name])
            conn.execute(text(f"CREATE VIEW old_{name} AS {sql.strip()}"))


def drop_old_views(db: Any) -> None:
    with db.engine.begin() as conn:
        for name in reversed(REBUILT):
            conn.execute(text(f"DROP VIEW old_{name}"))


def test_the_rebuilt_views_equal_the_old_definitions(db):
    populate(db)
    create_old_views(db)
    try:
        new, old = snapshot(db), snapshot(db, "old_")
    finally:
        drop_old_views(db)
    assert {name: len(rows) for name, rows in new.items()} == {
        "v_drafts": 6,
        "v_turnaround": 5,
        "v_turnaround_by_model": 2,
        "v_model_quality": 2,
    }
    assert new == old
    with db.engine.connect() as conn:
        columns = {name: list(conn.execute(text(f"SELECT * FROM {name}")).keys()) for name in REBUILT}
    assert columns["v_drafts"] == [c.name for c in aq.v_drafts.columns]
    assert columns["v_turnaround"] == [c.name for c in aq.v_turnaround.columns]


def test_upgrade_backfills_a_database_of_the_old_shape_and_downgrade_restores_it(db):
    migrations.downgrade(db.engine, PREVIOUS)
    assert "draft_outcomes" not in db.table_names()
    ids = populate(db, outcomes=False)  # written as before 0008: no outcome rows
    before = snapshot(db)
    stats_before = [q.as_dict() for q in aq.turnaround_by_model(db, since=T0)]

    db.upgrade()
    assert db.is_current()
    with db.engine.connect() as conn:
        backfilled = set(conn.execute(text("SELECT draft_sr_id FROM draft_outcomes")).scalars())
    assert backfilled == {draft_id for name, draft_id in ids.items() if name.startswith("draft:")}
    assert snapshot(db) == before
    assert [q.as_dict() for q in aq.turnaround_by_model(db, since=T0)] == stats_before

    migrations.downgrade(db.engine, PREVIOUS)
    assert "draft_outcomes" not in db.table_names()
    assert set(REBUILT) <= set(inspect(db.engine).get_view_names())
    assert snapshot(db) == before
    with db.engine.connect() as conn:  # 0004's own v_drafts again, reading the base tables
        definition = (
            conn.execute(text("SELECT pg_get_viewdef('v_drafts')")).scalar_one()
            if db.engine.dialect.name == "postgresql"
            else conn.execute(text("SELECT sql FROM sqlite_master WHERE name = 'v_drafts'")).scalar_one()
        )
    assert "draft_outcomes" not in definition and "reviews" in definition
    db.upgrade()
    assert snapshot(db) == before


@pytest.mark.parametrize("view", ["v_drafts", "v_turnaround"])
def test_the_views_read_the_outcome_table(db, view):
    with db.engine.connect() as conn:
        definition = (
            conn.execute(text(f"SELECT pg_get_viewdef('{view}')")).scalar_one()
            if db.engine.dialect.name == "postgresql"
            else conn.execute(text(f"SELECT sql FROM sqlite_master WHERE name = '{view}'")).scalar_one()
        )
    assert "draft_outcomes" in definition and "reviews" not in definition


def random_history(db: Any, seed: int, studies: int = 120) -> None:
    """Studies with one to three versions, drafts of three models (some SRs with series of two models),
    reviews in any order, times to the microsecond, ties in edit distance: the rows are refreshed as
    drafting and review refresh them, one transaction per draft or decision."""
    rng = random.Random(seed)
    models = [("msmedcap", "1.0", "a" * 64), ("msmedcap", "1.1", "b" * 64), ("other", "1.0", "c" * 64)]
    with db.session() as s:
        reviewer = User(
            username="reader",
            display_name="Reader^R",
            role="radiologist",
            password_hash="x",
            disabled=False,
            created_at=T0,
            password_changed_at=T0,
        )
        s.add(reviewer)
        s.flush()
        reviewer_id = reviewer.id
    drafts: list[tuple[int, int, datetime]] = []  # (draft SR id, study id, drafted at)
    for n in range(studies):
        received = T0 + timedelta(seconds=rng.uniform(0, 86400 * 60))
        with db.session() as s:
            study = Study(study_uid=f"2.25.{seed}.{n}", accession_number=f"R{n}", patient_id=f"P{n % 7}", first_received_at=received)
            s.add(study)
            s.flush()
            for number in range(1, rng.choice([1, 1, 1, 2, 3]) + 1):
                version = StudyVersion(
                    study_id=study.id, number=number, created_at=received, trigger="stable", instance_count=1, captionable_count=1
                )
                s.add(version)
                s.flush()
                job = Job(study_version_id=version.id, status="succeeded", created_at=received, attempts=1, worker="worker:gpu1")
                s.add(job)
                s.flush()
                drafted = received + timedelta(seconds=rng.uniform(20, 600) * number)
                doc = SRDocument(
                    kind="draft",
                    idempotency_key=f"draft:{version.id}",
                    study_id=study.id,
                    study_version_id=version.id,
                    job_id=job.id,
                    sop_instance_uid=f"2.25.{seed}.{n}.{number}",
                    series_uid=f"2.25.{seed}.{n}.{number}.9",
                    completion_flag="PARTIAL",
                    verification_flag="UNVERIFIED",
                    path="/nonexistent",
                    sha256="0" * 64,
                    created_at=drafted,
                    created_by="worker:gpu1",
                )
                s.add(doc)
                s.flush()
                for series in range(rng.choice([1, 2])):
                    model = rng.choice(models)
                    s.add(
                        Draft(
                            sr_document_id=doc.id,
                            job_id=job.id,
                            series_uid=f"{doc.series_uid}.{series}",
                            text="x",
                            key_images=[],
                            model_name=model[0],
                            model_type="msmedcap",
                            model_version=model[1],
                            weights_sha256=model[2],
                            generation_preset="fast",
                            created_at=drafted,
                        )
                    )
                draft_outcomes.refresh(s, doc.id)
                drafts.append((doc.id, study.id, drafted))
    rng.shuffle(drafts)
    for draft_id, _study, drafted in drafts:
        decision = rng.choice([None, "approved", "approved", "approved", "rejected"])
        if decision is None:
            continue
        with db.session() as s:
            edit = rng.choice([0, 0, 3, 3, 7, 20, 41])
            s.add(
                Review(
                    draft_sr_id=draft_id,
                    decision=decision,
                    reviewer_id=reviewer_id,
                    decided_at=drafted + timedelta(seconds=rng.uniform(60, 86400)),
                    findings=[],
                    edited=edit > 0,
                    edit_distance=edit,
                    draft_characters=rng.choice([0, 80, 200]),
                )
            )
            draft_outcomes.refresh(s, draft_id)


@pytest.mark.parametrize("seed", [1, 2])
def test_the_rebuilt_views_equal_the_old_definitions_on_a_random_history(db, seed):
    random_history(db, seed)
    create_old_views(db)
    try:
        new, old = snapshot(db), snapshot(db, "old_")
    finally:
        drop_old_views(db)
    assert len(new["v_drafts"]) > 150 and len(new["v_turnaround_by_model"]) == 3
    assert new == old
    # The statistics functions: all time (the views) and through an all-covering window (their own queries).
    everything = {"since": T0 - timedelta(days=1), "until": T0 + timedelta(days=400)}
    assert stats(aq.turnaround_by_model(db)) == stats(aq.turnaround_by_model(db, **everything))
    assert stats(aq.model_quality(db)) == stats(aq.model_quality(db, **everything))


def test_two_drafts_of_one_study_committed_at_once_leave_one_newest(db):
    if db.engine.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer at a time")
    ids = populate(db, outcomes=False)
    older, newer = ids["draft:A1004:1"], ids["draft:A1004:2"]
    with db.engine.begin() as conn:
        conn.execute(text("DELETE FROM draft_outcomes"))
    second_done = threading.Event()

    def second() -> None:
        with db.session() as s:
            draft_outcomes.refresh(s, older)  # waits for the first transaction's lock on the study
        second_done.set()

    with db.session() as s:
        draft_outcomes.refresh(s, newer)
        thread = threading.Thread(target=second)
        thread.start()
        assert not second_done.wait(1.0), "the second refresh must wait for the first to commit"
    thread.join(10)
    assert second_done.is_set()
    with db.engine.connect() as conn:
        latest = dict(conn.execute(text(f"SELECT draft_sr_id, latest FROM draft_outcomes WHERE draft_sr_id IN ({older}, {newer})")).all())
    assert latest == {older: False, newer: True}
