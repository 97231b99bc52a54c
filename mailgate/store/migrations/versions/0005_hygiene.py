"""hygiene: the sender-authentication verdict of each inbound article; the
normalised subject of each ticket, for the circuit breaker

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("articles", schema=None) as batch_op:
        batch_op.add_column(sa.Column("authentication", sa.String(300), nullable=True))
    with op.batch_alter_table("tickets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("subject_key", sa.String(64), nullable=True))
        batch_op.create_index(
            "ix_tickets_org_subject_created", ["organisation_id", "subject_key", "created_at"]
        )
        batch_op.create_index("ix_tickets_requester_created", ["requester_id", "created_at"])


def downgrade() -> None:
    with op.batch_alter_table("tickets", schema=None) as batch_op:
        batch_op.drop_index("ix_tickets_requester_created")
        batch_op.drop_index("ix_tickets_org_subject_created")
        batch_op.drop_column("subject_key")
    with op.batch_alter_table("articles", schema=None) as batch_op:
        batch_op.drop_column("authentication")
