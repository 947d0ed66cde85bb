"""atna: the outbox of audit events still to be copied to the hospital's audit repository

Revision ID: 0012
Revises: 0011
``audit_outbox`` holds one row per audit event that the IHE ATNA copy (RFC 5424 syslog, TLS or
UDP) still owes: written in the event's own transaction when MEDCAP_AUDIT_SYSLOG_URL is set,
deleted by service/syslog_sender.py once the message is sent, retried until then. The audit
events stay the record; nothing here is read by the audit views.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0012"
down_revision: str | Sequence[str] | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "audit_outbox",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("event_id", BIG_ID, sa.ForeignKey("audit_events.id", name="fk_audit_outbox_event_id_audit_events"), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.String(500), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_audit_outbox"),
        sa.UniqueConstraint("event_id", name="uq_audit_outbox_event_id"),
    )
    op.create_index("ix_audit_outbox_next_attempt_at", "audit_outbox", ["next_attempt_at"])


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index("ix_audit_outbox_next_attempt_at", table_name="audit_outbox")
    op.drop_table("audit_outbox")
