"""Migration 0009 on both backends: ``drafts.header_facts`` and ``drafts.removed_sentences``
added (drafts written before stay NULL: they were never grounded), and removed again with every row kept."""

from __future__ import annotations

from sqlalchemy import inspect, select, update

import migrations
from service.schema import Draft
from tests.migrations.audit_data import populate

MIGRATION = migrations.revision_module("0009")
PREVIOUS = MIGRATION.down_revision  # rechained at a merge: nothing here names the revision before

REMOVED = [{"sentence": "axial mr of the chest", "reasons": ["names MR; the header says CT (Modality)"]}]


def columns(db) -> set[str]:
    return {c["name"] for c in inspect(db.engine).get_columns("drafts")}


def test_the_grounding_columns_come_and_go_and_the_rows_stay(db):
    populate(db)
    with db.session() as s:
        first = s.scalars(select(Draft.id).order_by(Draft.id)).first()
        assert first is not None
        s.execute(update(Draft).where(Draft.id == first).values(header_facts={"modality": "CT"}, removed_sentences=REMOVED))
        before = s.execute(select(Draft.id, Draft.series_uid, Draft.text).order_by(Draft.id)).all()
    assert {"header_facts", "removed_sentences"} <= columns(db)
    migrations.downgrade(db.engine, PREVIOUS)
    assert migrations.current_revision(db.engine) == PREVIOUS and not {"header_facts", "removed_sentences"} & columns(db)
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM drafts").scalar() == len(before)
        assert conn.exec_driver_sql("SELECT * FROM v_drafts").all()  # the views still work
    db.upgrade()
    assert db.is_current()
    with db.session() as s:
        after = s.execute(
            select(Draft.id, Draft.series_uid, Draft.text, Draft.header_facts, Draft.removed_sentences).order_by(Draft.id)
        ).all()
    assert [tuple(r[:3]) for r in after] == [tuple(r) for r in before]
    assert {(r[3], r[4]) for r in after} == {(None, None)}  # dropped with the columns; older drafts were never grounded


def test_grounding_is_stored_with_the_draft(db):
    populate(db)
    with db.session() as s:
        first = s.scalars(select(Draft).order_by(Draft.id)).first()
        assert first is not None and first.header_facts is None and first.removed_sentences is None
        first.header_facts, first.removed_sentences = {"modality": "CT", "plane": "axial"}, REMOVED
    with db.session() as s:
        again = s.scalars(select(Draft).order_by(Draft.id)).first()
        assert again is not None and again.removed_sentences == REMOVED and again.header_facts == {"modality": "CT", "plane": "axial"}
