"""Migration 0008 (draft_outcomes): the rebuilt views give exactly what 0004's definitions give on the
same data, the upgrade backfills a database written before it, and the downgrade restores 0004's views."""

from __future__ import annotations

import re
from types import ModuleType
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

import migrations
from service import audit_queries as aq
from tests.migrations.audit_data import T0, populate

MIGRATION: ModuleType = ScriptDirectory.from_config(migrations.alembic_config(None)).get_revision("0008").module  # type: ignore[arg-type, union-attr]
PREVIOUS: str = MIGRATION.down_revision
REBUILT = MIGRATION.REBUILT


def snapshot(db: Any, prefix: str = "") -> dict[str, list[tuple[Any, ...]]]:
    """Every row of each rebuilt view, sorted (the views have no order)."""
    with db.engine.connect() as conn:
        return {name: sorted((tuple(r) for r in conn.execute(text(f"SELECT * FROM {prefix}{name}"))), key=repr) for name in REBUILT}


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
