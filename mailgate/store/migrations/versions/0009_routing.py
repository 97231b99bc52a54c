"""routing: staff groups a rule sends a ticket to, and organisations' referents

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("staff", schema=None) as batch_op:
        batch_op.add_column(sa.Column("groups", sa.JSON(), nullable=False, server_default="[]"))
    with op.batch_alter_table("tickets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("group", sa.String(length=64), nullable=True))
    with op.batch_alter_table("contacts", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("referent", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("contacts", schema=None) as batch_op:
        batch_op.drop_column("referent")
    with op.batch_alter_table("tickets", schema=None) as batch_op:
        batch_op.drop_column("group")
    with op.batch_alter_table("staff", schema=None) as batch_op:
        batch_op.drop_column("groups")
