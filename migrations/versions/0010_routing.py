"""routing decisions: what the routing rules decided for each series of a study version

Revision ID: 0010
Revises: 0009
The caption worker decides every series of a study version with the routing rules
(service/routing.py) and records each decision with the job's outcome: the rule's name, caption or
skip, the model, the rule's destinations (which the verified report follows too), why, and which
rule file. A new table only; nothing existing changes, and the
downgrade drops it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "routing_decisions",
        sa.Column("id", BigId, nullable=False),
        sa.Column("study_version_id", BigId, nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("rule", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=True),
        sa.Column("destinations", sa.JSON(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("rules_source", sa.String(length=300), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_version_id"], ["study_versions.id"], name=op.f("fk_routing_decisions_study_version_id_study_versions")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_routing_decisions")),
        sa.UniqueConstraint("study_version_id", "series_uid", name=op.f("uq_routing_decisions_study_version_id_series_uid")),
    )
    op.create_index(op.f("ix_routing_decisions_study_version_id"), "routing_decisions", ["study_version_id"], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index(op.f("ix_routing_decisions_study_version_id"), table_name="routing_decisions")
    op.drop_table("routing_decisions")
