"""admin aggregates: one outcome row per draft SR, kept as drafts and reviews are written

Revision ID: 0008
Revises: 0005 (a placeholder: 0006 and 0007 land first; only ``down_revision`` changes)
The audit views of 0004 joined six tables (draft SRs, studies, versions, the first series' draft,
reviews, users, verified SRs) for every query, and the per-model statistics over all studies
took a few hundred milliseconds with a year of work. ``draft_outcomes`` holds that join, one row
per draft SR, written by service/draft_outcomes.py in the transaction that writes the draft
(workers/drafting.py) and again in the one that decides it (service/review.py). ``v_drafts`` and
``v_turnaround`` now read it; ``v_turnaround_by_model`` and ``v_model_quality`` are recreated
unchanged on top (views bind to the views they read). Same columns, same rows: the tests compare
them with 0004's definitions on the same data. ``v_audit_trail`` and ``v_failed_work`` stay.

The upgrade backfills the table from the existing rows with 0004's ``v_drafts`` query; the
downgrade restores 0004's views and drops the table.
"""

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0008"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

REBUILT = ("v_drafts", "v_turnaround", "v_turnaround_by_model", "v_model_quality")  # in creation order

COLUMNS = (
    "draft_sr_id, draft_sr_uid, study_id, study_uid, accession_number, patient_id, patient_name, study_version, "
    "model_name, model_version, weights_sha256, received_at, drafted_at, decision, decided_at, reviewer, edited, "
    "edit_distance, draft_characters, verified_sr_uid"
)


def _audit_views() -> ModuleType:
    """Migration 0004, for its view definitions (the per-model views are reused as they are, and the downgrade restores them all)."""
    path = Path(__file__).resolve().with_name("0004_audit_views.py")
    spec = importlib.util.spec_from_file_location("medcap_migration_0004", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def views(dialect: str) -> dict[str, str]:
    """name -> SELECT of the views this migration rebuilds, in creation order."""
    old = _audit_views().views(dialect)
    seconds = _audit_views()._seconds
    return {
        "v_drafts": f"SELECT {COLUMNS} FROM draft_outcomes",
        # Per study, its newest draft: an index anti-join on (study_id, draft_sr_id) rather than the
        # old anti-join over sr_documents (every draft SR has an outcome row, written with it).
        "v_turnaround": f"""
            SELECT t.study_uid, t.accession_number, t.patient_id, t.study_version, t.draft_sr_id, t.draft_sr_uid,
                   t.model_name, t.model_version, t.weights_sha256,
                   t.received_at, t.drafted_at, CASE WHEN t.decision = 'approved' THEN t.decided_at END AS approved_at,
                   {seconds(dialect, "t.received_at", "t.drafted_at")} AS draft_seconds,
                   CASE WHEN t.decision = 'approved' THEN {seconds(dialect, "t.drafted_at", "t.decided_at")} END AS approval_seconds,
                   CASE WHEN t.decision = 'approved' THEN {seconds(dialect, "t.received_at", "t.decided_at")} END AS total_seconds
            FROM draft_outcomes t
            WHERE NOT EXISTS (SELECT 1 FROM draft_outcomes b WHERE b.study_id = t.study_id AND b.draft_sr_id > t.draft_sr_id)""",
        "v_turnaround_by_model": old["v_turnaround_by_model"],
        "v_model_quality": old["v_model_quality"],
    }


def _drop_views() -> None:
    for name in reversed(REBUILT):
        op.execute(f"DROP VIEW IF EXISTS {name}")


def upgrade() -> None:
    """Upgrade schema."""
    dialect = op.get_bind().dialect.name
    old = _audit_views().views(dialect)
    op.create_table(
        "draft_outcomes",
        sa.Column("draft_sr_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("draft_sr_uid", sa.String(length=64), nullable=False),
        sa.Column("study_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("accession_number", sa.String(length=16), nullable=True),
        sa.Column("patient_id", sa.String(length=64), nullable=True),
        sa.Column("patient_name", sa.String(length=324), nullable=True),
        sa.Column("study_version", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(length=64), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("weights_sha256", sa.String(length=64), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("drafted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decision", sa.String(length=16), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reviewer", sa.String(length=64), nullable=True),
        sa.Column("edited", sa.Boolean(), nullable=True),
        sa.Column("edit_distance", sa.Integer(), nullable=True),
        sa.Column("draft_characters", sa.Integer(), nullable=True),
        sa.Column("verified_sr_uid", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(["draft_sr_id"], ["sr_documents.id"], name=op.f("fk_draft_outcomes_draft_sr_id_sr_documents")),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], name=op.f("fk_draft_outcomes_study_id_studies")),
        sa.PrimaryKeyConstraint("draft_sr_id", name=op.f("pk_draft_outcomes")),
    )
    # Backfill before the indexes (one sort each instead of index maintenance per row).
    op.execute(f"INSERT INTO draft_outcomes ({COLUMNS}) SELECT {COLUMNS} FROM ({old['v_drafts'].strip()}) d")
    op.create_index("ix_draft_outcomes_study_id_draft_sr_id", "draft_outcomes", ["study_id", "draft_sr_id"], unique=False)
    op.create_index(op.f("ix_draft_outcomes_received_at"), "draft_outcomes", ["received_at"], unique=False)
    op.create_index(op.f("ix_draft_outcomes_drafted_at"), "draft_outcomes", ["drafted_at"], unique=False)
    _drop_views()
    for name, select in views(dialect).items():
        op.execute(f"CREATE VIEW {name} AS {select.strip()}")
    if dialect == "postgresql":
        op.execute("ANALYZE draft_outcomes")  # plan the views on real statistics from the first query on


def downgrade() -> None:
    """Downgrade schema."""
    old = _audit_views().views(op.get_bind().dialect.name)
    _drop_views()
    for name in REBUILT:
        op.execute(f"CREATE VIEW {name} AS {old[name].strip()}")
    op.drop_index(op.f("ix_draft_outcomes_drafted_at"), table_name="draft_outcomes")
    op.drop_index(op.f("ix_draft_outcomes_received_at"), table_name="draft_outcomes")
    op.drop_index("ix_draft_outcomes_study_id_draft_sr_id", table_name="draft_outcomes")
    op.drop_table("draft_outcomes")
