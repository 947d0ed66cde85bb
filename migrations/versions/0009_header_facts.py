"""header facts: what each draft was checked against, and the sentences taken out of it

Revision ID: 0009
Revises: 0008
A draft's text now starts with a heading made from its series' DICOM header facts, and model
sentences contradicting those facts are removed (models/grounding.py). ``drafts.header_facts``
keeps the facts the text was checked against and ``drafts.removed_sentences`` each removed
sentence with its reasons, written in the same transaction as the draft, for the review page and
the audit trail. Two nullable columns: drafts written before this revision have neither (they
were not grounded), no table is rebuilt, and the views of 0004/0008 stay as they are.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.add_column("drafts", sa.Column("header_facts", sa.JSON(), nullable=True))
    op.add_column("drafts", sa.Column("removed_sentences", sa.JSON(), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    # Plain DROP COLUMN (SQLite 3.35+), as 0007: no view reads these columns.
    op.drop_column("drafts", "removed_sentences")
    op.drop_column("drafts", "header_facts")
