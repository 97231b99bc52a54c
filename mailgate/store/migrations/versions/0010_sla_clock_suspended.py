"""SLA clocks: a target that is no longer the ticket's priority's is suspended,
not deleted, so that what was sent about it is not sent again if it comes back

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sla_clocks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("suspended_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    op.execute("DELETE FROM sla_clocks WHERE suspended_at IS NOT NULL")
    with op.batch_alter_table("sla_clocks", schema=None) as batch_op:
        batch_op.drop_column("suspended_at")
