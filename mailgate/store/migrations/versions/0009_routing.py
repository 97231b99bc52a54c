"""routing: staff groups a rule sends a ticket to, and organisations' referents;
two privacy repairs of existing rows

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
    op.create_index(
        op.f("ix_ingest_records_duplicate_of_id"), "ingest_records", ["duplicate_of_id"]
    )
    # A released record's bytes are its release's (the same content-addressed
    # blob): only the release, with its ticket, may keep them for retention and
    # erasure to find. An anonymised ticket no longer names its requester.
    op.execute("UPDATE ingest_records SET raw_sha256 = NULL WHERE outcome = 'released'")
    op.execute("UPDATE tickets SET requester_id = NULL WHERE anonymised_at IS NOT NULL")


def downgrade() -> None:
    op.drop_index(op.f("ix_ingest_records_duplicate_of_id"), table_name="ingest_records")
    with op.batch_alter_table("contacts", schema=None) as batch_op:
        batch_op.drop_column("referent")
    with op.batch_alter_table("tickets", schema=None) as batch_op:
        batch_op.drop_column("group")
    with op.batch_alter_table("staff", schema=None) as batch_op:
        batch_op.drop_column("groups")
