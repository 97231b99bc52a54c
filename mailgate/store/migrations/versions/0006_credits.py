"""credits: packs bought, the append-only ledger, and tickets confirmed as bugs

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tickets", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("bug", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    op.create_table(
        "credit_packs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("organisation_id", sa.String(length=64), nullable=False),
        sa.Column("pack", sa.String(length=40), nullable=False),
        sa.Column("credits", sa.Integer(), nullable=False),
        sa.Column("activated_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("reference", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["organisation_id"],
            ["organisations.id"],
            name=op.f("fk_credit_packs_organisation_id_organisations"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_credit_packs")),
    )
    op.create_index(op.f("ix_credit_packs_organisation_id"), "credit_packs", ["organisation_id"])
    op.create_table(
        "credit_entries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("organisation_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("credits", sa.Integer(), nullable=False),
        sa.Column("pack_id", sa.Integer(), nullable=True),
        sa.Column("ticket_id", sa.Integer(), nullable=True),
        sa.Column("time_entry_id", sa.Integer(), nullable=True),
        sa.Column("reverses_id", sa.Integer(), nullable=True),
        sa.Column("note", sa.String(length=300), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["organisation_id"],
            ["organisations.id"],
            name=op.f("fk_credit_entries_organisation_id_organisations"),
        ),
        sa.ForeignKeyConstraint(
            ["pack_id"], ["credit_packs.id"], name=op.f("fk_credit_entries_pack_id_credit_packs")
        ),
        sa.ForeignKeyConstraint(
            ["ticket_id"], ["tickets.id"], name=op.f("fk_credit_entries_ticket_id_tickets")
        ),
        sa.ForeignKeyConstraint(
            ["time_entry_id"],
            ["time_entries.id"],
            name=op.f("fk_credit_entries_time_entry_id_time_entries"),
        ),
        sa.ForeignKeyConstraint(
            ["reverses_id"],
            ["credit_entries.id"],
            name=op.f("fk_credit_entries_reverses_id_credit_entries"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_credit_entries")),
    )
    op.create_index("ix_credit_entries_org_at", "credit_entries", ["organisation_id", "at"])
    op.create_index(op.f("ix_credit_entries_pack_id"), "credit_entries", ["pack_id"])
    op.create_index(op.f("ix_credit_entries_ticket_id"), "credit_entries", ["ticket_id"])


def downgrade() -> None:
    op.drop_table("credit_entries")
    op.drop_table("credit_packs")
    with op.batch_alter_table("tickets", schema=None) as batch_op:
        batch_op.drop_column("bug")
