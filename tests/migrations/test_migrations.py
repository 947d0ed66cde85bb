"""The migrations: same revisions on PostgreSQL and SQLite, matching the models, audit kept append-only."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import delete, select, update
from sqlalchemy.exc import DBAPIError

import migrations
from service import audit
from service.audit import Action
from service.schema import AuditEvent, Base


def test_migrated_schema_matches_the_models(db):
    assert db.is_current()
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_downgrade_to_base_and_up_again(db):
    migrations.downgrade(db.engine, "base")
    assert db.table_names() == ["alembic_version"]
    db.upgrade()
    assert db.is_current()
    assert {"associations", "studies", "series", "instances", "study_versions", "jobs", "audit_events"} <= set(db.table_names())


def test_audit_events_are_append_only(db):
    with db.session() as s:
        audit.record(s, datetime.now(UTC), "cli:tester", Action.DATABASE_UPGRADED, "database", "x", note="kept")
    with pytest.raises(DBAPIError, match="append-only"):
        with db.session() as s:
            s.execute(update(AuditEvent).values(actor="someone else"))
    with pytest.raises(DBAPIError, match="append-only"):
        with db.session() as s:
            s.execute(delete(AuditEvent))
    with db.session() as s:
        event = s.scalars(select(AuditEvent)).one()
    assert event.actor == "cli:tester" and event.details == {"note": "kept"}


def test_times_come_back_timezone_aware(db):
    at = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    with db.session() as s:
        audit.record(s, at, "cli:tester", Action.DATABASE_UPGRADED, "database", "x")
    with db.session() as s:
        got = s.scalar(select(AuditEvent.at))
    assert got == at and got.tzinfo is not None
