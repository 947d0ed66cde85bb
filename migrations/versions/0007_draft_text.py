"""draft text: the impression an SR holds, kept beside it in the database

Revision ID: 0007
Revises: 0006
The review page showed the impression by reading the draft SR file on every view; the findings'
texts were in ``drafts`` already. ``sr_documents.impression`` now holds it, written with the SR.
Existing rows are not backfilled here: reading every SR file inside the upgrade would make its
time grow with the archive and fail wherever the report files are not mounted (``medcap db
upgrade`` run apart from the workers, relative report paths). Instead the review page reads the
file of a row without it once, on its first view, and stores the text (service/review.py). One
nullable column: no table is rebuilt, so the audit views of 0004 stay as they are.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.add_column("sr_documents", sa.Column("impression", sa.Text(), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    # Plain DROP COLUMN (SQLite 3.35+): a batch rebuild of ``sr_documents`` would break 0004's views.
    op.drop_column("sr_documents", "impression")
