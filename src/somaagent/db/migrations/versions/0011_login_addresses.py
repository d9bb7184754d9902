"""identity: the addresses each user has logged in from (new-address sign-in alerts)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 19:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import somaagent.db.base

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "login_addresses",
        sa.Column("user_id", sa.String(length=40), nullable=False),
        sa.Column("address", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("first_seen_at", somaagent.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", somaagent.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("user_id", "address"),
    )
    op.create_index(op.f("ix_login_addresses_tenant_id"), "login_addresses", ["tenant_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_login_addresses_tenant_id"), table_name="login_addresses")
    op.drop_table("login_addresses")
