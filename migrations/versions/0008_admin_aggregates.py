"""admin aggregates: one outcome row per draft SR, kept as drafts and reviews are written

Revision ID: 0008
Revises: 0007
The audit views of 0004 joined six tables (draft SRs, studies, versions, the first series' draft,
reviews, users, verified SRs) for every query, and the per-model statistics sorted every study:
with a year of work, a few hundred milliseconds per query. ``draft_outcomes`` holds that join, one
row per draft SR, with v_turnaround's seconds and whether it is its study's newest draft; it is
written by service/draft_outcomes.py in the transaction that writes the draft (workers/drafting.py)
and again in the one that decides it (service/review.py).

* ``v_drafts`` and ``v_turnaround`` read it (one table, no joins);
* on PostgreSQL ``v_turnaround_by_model`` and ``v_model_quality`` count per model and read each
  nearest-rank percentile off a partial index at its offset (the value percentile_disc finds after
  sorting them all); on SQLite they stay 0004's window functions over the views above.

Same columns, same rows: the tests compare every rebuilt view with 0004's definition on the same
data. ``v_audit_trail`` and ``v_failed_work`` stay as they are. The upgrade backfills the table from
0004's views; the downgrade restores them and drops the table.
"""

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MODEL = "model_name, model_version, weights_sha256"
REBUILT = ("v_drafts", "v_turnaround", "v_turnaround_by_model", "v_model_quality")  # in creation order

# The per-model percentiles read these partial indexes at an offset (see _pick).
PERCENTILE_INDEXES = (
    ("draft_seconds", "latest"),
    ("approval_seconds", "latest AND approval_seconds IS NOT NULL"),
    ("total_seconds", "latest AND total_seconds IS NOT NULL"),
    ("edit_distance", "decision = 'approved' AND edit_distance IS NOT NULL"),
)

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


def _pick(column: str, n: str, percent: int, where: str) -> str:
    """The ``percent``-th nearest-rank percentile of ``column`` within the model group ``m``: the value at
    position k = ceil(percent/100 * n) in ascending order, as percentile_disc finds it after sorting
    them all, read here off the partial index on (model, column) at that offset (NULL when n is 0).
    Above the median it is walked from the top, at offset n - k, so that a 90th percentile reads a
    tenth of the index rather than nine tenths."""
    k = f"({percent} * m.{n} + 99) / 100"
    order, offset = (f"o.{column} DESC", f"m.{n} - {k}") if percent > 50 else (f"o.{column}", f"{k} - 1")
    return f"""(SELECT o.{column} FROM draft_outcomes o
                     WHERE {where} AND o.{column} IS NOT NULL AND o.model_name = m.model_name
                       AND o.model_version = m.model_version AND o.weights_sha256 = m.weights_sha256
                     ORDER BY {order} OFFSET GREATEST({offset}, 0) LIMIT 1)"""


def _turnaround_by_model() -> str:
    columns = ",\n                   ".join(
        f"{_pick(f'{name}_seconds', n, p, 'o.latest')} AS {name}_{label}_seconds"
        for name, n in (("draft", "drafted"), ("approval", "approved"), ("total", "approved"))
        for p, label in ((50, "median"), (90, "p90"))
    )
    return f"""
            SELECT m.model_name, m.model_version, m.weights_sha256, m.studies, m.approved,
                   {columns}
            FROM (SELECT {MODEL}, COUNT(*) AS studies, COUNT(draft_seconds) AS drafted, COUNT(approval_seconds) AS approved
                  FROM draft_outcomes WHERE latest GROUP BY {MODEL}) m"""


def _model_quality() -> str:
    median = _pick("edit_distance", "approved_edits", 50, "o.decision = 'approved'")
    return f"""
            SELECT m.model_name, m.model_version, m.weights_sha256, m.drafts, m.reviewed, m.approved, m.approved_unchanged,
                   m.rejected, m.approved_unchanged_rate, m.mean_edit_distance, {median} AS median_edit_distance,
                   m.normalised_edit_distance
            FROM (
                SELECT {MODEL},
                       COUNT(*) AS drafts,
                       COUNT(decision) AS reviewed,
                       SUM(CASE WHEN decision = 'approved' THEN 1 ELSE 0 END) AS approved,
                       SUM(CASE WHEN decision = 'approved' AND NOT edited THEN 1 ELSE 0 END) AS approved_unchanged,
                       SUM(CASE WHEN decision = 'rejected' THEN 1 ELSE 0 END) AS rejected,
                       CAST(SUM(CASE WHEN decision = 'approved' AND NOT edited THEN 1 ELSE 0 END) AS DOUBLE PRECISION)
                           / NULLIF(COUNT(decision), 0) AS approved_unchanged_rate,
                       AVG(CASE WHEN decision = 'approved' THEN CAST(edit_distance AS DOUBLE PRECISION) END) AS mean_edit_distance,
                       COUNT(CASE WHEN decision = 'approved' THEN edit_distance END) AS approved_edits,
                       AVG(CASE WHEN decision = 'approved' AND draft_characters > 0
                                THEN CAST(edit_distance AS DOUBLE PRECISION) / draft_characters END) AS normalised_edit_distance
                FROM draft_outcomes
                GROUP BY {MODEL}
            ) m"""


def views(dialect: str) -> dict[str, str]:
    """name -> SELECT of the views this migration rebuilds, in creation order."""
    old = _audit_views().views(dialect)
    return {
        "v_drafts": f"SELECT {COLUMNS} FROM draft_outcomes",
        "v_turnaround": f"""
            SELECT study_uid, accession_number, patient_id, study_version, draft_sr_id, draft_sr_uid,
                   {MODEL}, received_at, drafted_at, CASE WHEN decision = 'approved' THEN decided_at END AS approved_at,
                   draft_seconds, approval_seconds, total_seconds
            FROM draft_outcomes
            WHERE latest""",
        # On SQLite, 0004's window functions over the views above (the same numbers; not what is slow).
        "v_turnaround_by_model": _turnaround_by_model() if dialect == "postgresql" else old["v_turnaround_by_model"],
        "v_model_quality": _model_quality() if dialect == "postgresql" else old["v_model_quality"],
    }


def _drop_views() -> None:
    for name in reversed(REBUILT):
        op.execute(f"DROP VIEW IF EXISTS {name}")


def upgrade() -> None:
    """Upgrade schema."""
    dialect = op.get_bind().dialect.name
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
        sa.Column("draft_seconds", sa.Float(), nullable=False),
        sa.Column("approval_seconds", sa.Float(), nullable=True),
        sa.Column("total_seconds", sa.Float(), nullable=True),
        sa.Column("latest", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["draft_sr_id"], ["sr_documents.id"], name=op.f("fk_draft_outcomes_draft_sr_id_sr_documents")),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], name=op.f("fk_draft_outcomes_study_id_studies")),
        sa.PrimaryKeyConstraint("draft_sr_id", name=op.f("pk_draft_outcomes")),
    )
    # Backfill from 0004's views (still in place) before the indexes are built. The seconds are
    # v_turnaround's own expression, for every draft; ``latest``: the draft is the one v_turnaround shows.
    seconds = _audit_views()._seconds
    op.execute(f"""
        INSERT INTO draft_outcomes ({COLUMNS}, draft_seconds, approval_seconds, total_seconds, latest)
        SELECT {", ".join(f"d.{c.strip()}" for c in COLUMNS.split(","))},
               {seconds(dialect, "d.received_at", "d.drafted_at")},
               CASE WHEN d.decision = 'approved' THEN {seconds(dialect, "d.drafted_at", "d.decided_at")} END,
               CASE WHEN d.decision = 'approved' THEN {seconds(dialect, "d.received_at", "d.decided_at")} END,
               EXISTS (SELECT 1 FROM v_turnaround t WHERE t.draft_sr_id = d.draft_sr_id)
        FROM v_drafts d""")
    op.create_index("ix_draft_outcomes_study_id_draft_sr_id", "draft_outcomes", ["study_id", "draft_sr_id"], unique=False)
    op.create_index(op.f("ix_draft_outcomes_received_at"), "draft_outcomes", ["received_at"], unique=False)
    op.create_index(op.f("ix_draft_outcomes_drafted_at"), "draft_outcomes", ["drafted_at"], unique=False)
    for column, where in PERCENTILE_INDEXES:
        op.create_index(
            f"ix_draft_outcomes_model_{column}",
            "draft_outcomes",
            ["model_name", "model_version", "weights_sha256", column],
            unique=False,
            postgresql_where=sa.text(where),
            sqlite_where=sa.text(where),
        )
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
    for column, _ in PERCENTILE_INDEXES:
        op.drop_index(f"ix_draft_outcomes_model_{column}", table_name="draft_outcomes")
    op.drop_index(op.f("ix_draft_outcomes_drafted_at"), table_name="draft_outcomes")
    op.drop_index(op.f("ix_draft_outcomes_received_at"), table_name="draft_outcomes")
    op.drop_index("ix_draft_outcomes_study_id_draft_sr_id", table_name="draft_outcomes")
    op.drop_table("draft_outcomes")
