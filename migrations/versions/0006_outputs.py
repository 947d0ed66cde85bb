"""outputs: dispatches send an output of a report, not the SR itself

Revision ID: 0006
Revises: 0005
A report (``sr_documents``) is rendered once per output kind into an ``outputs`` row (the DICOM
SR's output is its own SR file); a dispatch sends one output to one destination of its kind
(service/outputs). Existing dispatches are carried over: every SR with a dispatch gets its
``dicom-sr`` output, and each dispatch points at it; statuses, attempts and ids are kept.
``v_failed_work`` keeps its columns and meaning, joined through ``outputs``.

A downgrade is refused while outputs of another kind than ``dicom-sr`` exist: their dispatches
have no SR to point at.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

_FAILED_JOBS = """
    SELECT 'job' AS kind, j.id AS job_id, CAST(NULL AS BIGINT) AS dispatch_id, st.study_uid, st.accession_number,
           sv.number AS study_version, CAST(NULL AS VARCHAR(64)) AS sr_uid, CAST(NULL AS VARCHAR(16)) AS sr_kind,
           CAST(NULL AS VARCHAR(300)) AS destination, j.attempts, j.error, j.finished_at AS failed_at
    FROM jobs j
    JOIN study_versions sv ON sv.id = j.study_version_id
    JOIN studies st ON st.id = sv.study_id
    WHERE j.status = 'failed'
    UNION ALL
    SELECT 'dispatch', sr.job_id, d.id, st.study_uid, st.accession_number, sv.number, sr.sop_instance_uid, sr.kind,
           d.destination, d.attempts, d.error,
           COALESCE((SELECT MAX(a.finished_at) FROM dispatch_attempts a WHERE a.dispatch_id = d.id), d.created_at)
    FROM dispatches d"""


def _failed_work(through_outputs: bool) -> str:
    join = (
        "JOIN outputs o ON o.id = d.output_id JOIN sr_documents sr ON sr.id = o.report_id"
        if through_outputs
        else "JOIN sr_documents sr ON sr.id = d.sr_document_id"
    )
    return f"""{_FAILED_JOBS}
    {join}
    JOIN study_versions sv ON sv.id = sr.study_version_id
    JOIN studies st ON st.id = sr.study_id
    WHERE d.status = 'failed'"""


def upgrade() -> None:
    """Upgrade schema."""
    op.execute("DROP VIEW v_failed_work")  # SQLite rebuilds ``dispatches`` below; a view on it would break
    op.create_table(
        "outputs",
        sa.Column("id", BigId, nullable=False),
        sa.Column("report_id", BigId, nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("media_type", sa.String(length=100), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["report_id"], ["sr_documents.id"], name=op.f("fk_outputs_report_id_sr_documents")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outputs")),
        sa.UniqueConstraint("report_id", "kind", name=op.f("uq_outputs_report_id_kind")),
    )
    op.create_index(op.f("ix_outputs_report_id"), "outputs", ["report_id"], unique=False)
    op.execute(
        """INSERT INTO outputs (report_id, kind, media_type, path, sha256, created_at)
           SELECT sr.id, 'dicom-sr', 'application/dicom', sr.path, sr.sha256, sr.created_at FROM sr_documents sr
           WHERE EXISTS (SELECT 1 FROM dispatches d WHERE d.sr_document_id = sr.id) ORDER BY sr.id"""
    )
    op.add_column("dispatches", sa.Column("output_id", BigId, nullable=True))
    op.execute(
        """UPDATE dispatches SET output_id =
           (SELECT o.id FROM outputs o WHERE o.report_id = dispatches.sr_document_id AND o.kind = 'dicom-sr')"""
    )
    with op.batch_alter_table("dispatches", schema=None) as batch_op:
        batch_op.alter_column("output_id", existing_type=BigId, nullable=False)
        batch_op.drop_constraint(batch_op.f("uq_dispatches_sr_document_id_destination"), type_="unique")
        batch_op.drop_index(batch_op.f("ix_dispatches_sr_document_id"))
        batch_op.drop_constraint(batch_op.f("fk_dispatches_sr_document_id_sr_documents"), type_="foreignkey")
        batch_op.drop_column("sr_document_id")
        batch_op.create_foreign_key(batch_op.f("fk_dispatches_output_id_outputs"), "outputs", ["output_id"], ["id"])
        batch_op.create_unique_constraint(batch_op.f("uq_dispatches_output_id_destination"), ["output_id", "destination"])
        batch_op.create_index(batch_op.f("ix_dispatches_output_id"), ["output_id"], unique=False)
    op.execute(f"CREATE VIEW v_failed_work AS {_failed_work(through_outputs=True).strip()}")


def downgrade() -> None:
    """Downgrade schema."""
    others = op.get_bind().execute(sa.text("SELECT DISTINCT kind FROM outputs WHERE kind <> 'dicom-sr'")).scalars().all()
    if others:
        raise RuntimeError(f"cannot downgrade below 0006: outputs of kind {', '.join(others)} exist, and 0005 dispatches only SRs")
    op.execute("DROP VIEW v_failed_work")
    op.add_column("dispatches", sa.Column("sr_document_id", BigId, nullable=True))
    op.execute("UPDATE dispatches SET sr_document_id = (SELECT o.report_id FROM outputs o WHERE o.id = dispatches.output_id)")
    with op.batch_alter_table("dispatches", schema=None) as batch_op:
        batch_op.alter_column("sr_document_id", existing_type=BigId, nullable=False)
        batch_op.drop_constraint(batch_op.f("uq_dispatches_output_id_destination"), type_="unique")
        batch_op.drop_index(batch_op.f("ix_dispatches_output_id"))
        batch_op.drop_constraint(batch_op.f("fk_dispatches_output_id_outputs"), type_="foreignkey")
        batch_op.drop_column("output_id")
        batch_op.create_foreign_key(batch_op.f("fk_dispatches_sr_document_id_sr_documents"), "sr_documents", ["sr_document_id"], ["id"])
        batch_op.create_unique_constraint(batch_op.f("uq_dispatches_sr_document_id_destination"), ["sr_document_id", "destination"])
        batch_op.create_index(batch_op.f("ix_dispatches_sr_document_id"), ["sr_document_id"], unique=False)
    op.drop_index(op.f("ix_outputs_report_id"), table_name="outputs")
    op.drop_table("outputs")
    op.execute(f"CREATE VIEW v_failed_work AS {_failed_work(through_outputs=False).strip()}")
