"""job leases: a claim names its worker process and lasts until its lease runs out

Revision ID: 0005
Revises: 0004
A running job records which process holds it (``host:pid``) and until when; the worker renews
the lease while it works. A job whose lease ran out, or whose process is gone, is taken over by
the next delivery (service/job_lifecycle.py). Jobs running when this migration runs have no
lease: they are taken over as before, once they have run for 15 minutes. Two nullable columns:
no table is rebuilt, so the audit views of 0004 stay as they are.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.add_column("jobs", sa.Column("claimed_by", sa.String(length=128), nullable=True))
    op.add_column("jobs", sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    # Plain DROP COLUMN (SQLite 3.35+): a batch rebuild of ``jobs`` would break 0004's views.
    op.drop_column("jobs", "lease_until")
    op.drop_column("jobs", "claimed_by")
