"""Contacts: whether the directory still lists them, so that retention forgets
only those gone from it, not those it lists as inactive (a suspended admin)

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("contacts", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("listed", sa.Boolean(), nullable=False, server_default=sa.true())
        )
    # Until the next sync tells them apart (the first start of this version
    # syncs again), an inactive contact is taken as gone, as before.
    op.execute(sa.text("UPDATE contacts SET listed = active"))


def downgrade() -> None:
    with op.batch_alter_table("contacts", schema=None) as batch_op:
        batch_op.drop_column("listed")
