"""dicomweb clients: the programs allowed to send studies over STOW-RS, with their token hashes

Revision ID: 0011
Revises: 0010
One table, written by service/dicomweb_clients.py (`medcap dicomweb-client add|remove`). A STOW-RS
request itself is recorded as an ``associations`` row (calling AE = the client's name), so the
instances it stores, the assembler's "open sender" check and the audit trail need no new columns.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "dicomweb_clients",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("name", sa.String(length=16), nullable=False),
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("networks", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dicomweb_clients")),
        sa.UniqueConstraint("name", name=op.f("uq_dicomweb_clients_name")),
        sa.UniqueConstraint("token_sha256", name=op.f("uq_dicomweb_clients_token_sha256")),
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table("dicomweb_clients")
