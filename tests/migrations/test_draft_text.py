"""Migration 0007 on both backends: ``sr_documents.impression`` added (existing rows left empty, for the
review page to fill on first view), and removed again by its downgrade with every row kept."""

from __future__ import annotations

from sqlalchemy import inspect, select, update

import migrations
from service.schema import SRDocument
from tests.migrations.audit_data import populate

MIGRATION = migrations.revision_module("0007")
PREVIOUS = MIGRATION.down_revision  # rechained at a merge: nothing here names the revision before


def columns(db) -> set[str]:
    return {c["name"] for c in inspect(db.engine).get_columns("sr_documents")}


def test_the_impression_column_comes_and_goes_and_the_rows_stay(db):
    ids = populate(db)
    with db.session() as s:
        s.execute(update(SRDocument).where(SRDocument.id == ids["draft:A1001:1"]).values(impression="No acute findings."))
        before = s.execute(select(SRDocument.id, SRDocument.sop_instance_uid).order_by(SRDocument.id)).all()
    assert "impression" in columns(db)
    migrations.downgrade(db.engine, PREVIOUS)
    assert migrations.current_revision(db.engine) == PREVIOUS and "impression" not in columns(db)
    with db.engine.connect() as conn:  # the 0004 views over sr_documents still work
        assert conn.exec_driver_sql("SELECT count(*) FROM sr_documents").scalar() == len(before)
        assert conn.exec_driver_sql("SELECT * FROM v_drafts").all()
    db.upgrade()
    assert db.is_current() and "impression" in columns(db)
    with db.session() as s:
        after = s.execute(select(SRDocument.id, SRDocument.sop_instance_uid, SRDocument.impression).order_by(SRDocument.id)).all()
    assert [(i, uid) for i, uid, _ in after] == [tuple(r) for r in before]
    assert {impression for _, _, impression in after} == {None}  # not backfilled: the review page reads a file once
