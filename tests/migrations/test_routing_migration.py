"""Migration 0010: the routing_decisions table comes and goes; nothing else changes."""

from __future__ import annotations

from sqlalchemy import func, inspect, select

import migrations
from service.routing import RuleAction
from service.schema import RoutingDecision, StudyVersion
from tests.migrations.audit_data import T0, populate

MIGRATION = migrations.revision_module("0010")


def test_upgrade_adds_routing_decisions_and_downgrade_drops_only_it(db):
    populate(db)
    with db.session() as s:
        version_id = s.scalars(select(StudyVersion.id)).first()
        s.add(
            RoutingDecision(
                study_version_id=version_id,
                series_uid="1.2.3.4",
                rule="scouts",
                action=RuleAction.SKIP.value,
                model=None,
                reason="skipped by rule scouts",
                rules_source="rules.toml",
                decided_at=T0,
            )
        )
    migrations.downgrade(db.engine, MIGRATION.revision)  # later revisions' tables out of the way first
    before = set(db.table_names())

    migrations.downgrade(db.engine, MIGRATION.down_revision)
    assert set(db.table_names()) == before - {"routing_decisions"}
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(StudyVersion)) >= 1  # the rest is kept

    migrations.upgrade(db.engine)
    assert db.is_current() and "routing_decisions" in db.table_names()
    columns = {c["name"] for c in inspect(db.engine).get_columns("routing_decisions")}
    assert columns == {
        "id",
        "study_version_id",
        "series_uid",
        "rule",
        "action",
        "model",
        "destinations",
        "reason",
        "rules_source",
        "decided_at",
    }
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(RoutingDecision)) == 0
