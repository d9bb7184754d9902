"""billing: the ledger, its rollups, the price book's cached and per-call prices

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 19:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import somaagent.db.base

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing prices: cached tokens cost what prompt tokens cost, no per-call price, in force since
    # they were created.
    with op.batch_alter_table("model_prices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cached_micros_per_mtok", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("call_micros", sa.BigInteger(), nullable=True))
        batch_op.add_column(
            sa.Column("effective_from", somaagent.db.base.UTCDateTime(timezone=True), nullable=True)
        )
    op.execute(
        "UPDATE model_prices SET cached_micros_per_mtok = prompt_micros_per_mtok, call_micros = 0, "
        "effective_from = created_at"
    )
    with op.batch_alter_table("model_prices", schema=None) as batch_op:
        batch_op.alter_column("cached_micros_per_mtok", existing_type=sa.BigInteger(), nullable=False)
        batch_op.alter_column("call_micros", existing_type=sa.BigInteger(), nullable=False)
        batch_op.alter_column(
            "effective_from", existing_type=somaagent.db.base.UTCDateTime(timezone=True), nullable=False
        )

    op.create_table(
        "ledger_entries",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("source_event_id", sa.String(length=64), nullable=True),
        sa.Column("request_id", sa.String(length=64), nullable=True),
        sa.Column("occurred_at", somaagent.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("item", sa.String(length=160), nullable=False),
        sa.Column("status", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.String(length=40), nullable=True),
        sa.Column("subject", sa.String(length=255), nullable=True),
        sa.Column("user_id", sa.String(length=40), nullable=True),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cached_tokens", sa.BigInteger(), nullable=False),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        sa.Column("amount_micros", sa.BigInteger(), nullable=False),
        sa.Column("priced", sa.Boolean(), nullable=False),
        sa.Column("price_version", sa.Integer(), nullable=True),
        sa.Column("corrects", sa.String(length=40), nullable=True),
        sa.Column("reason", sa.String(length=500), nullable=True),
        sa.Column("recorded_by", sa.String(length=255), nullable=True),
        sa.Column("recorded_at", somaagent.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_entries")),
        sa.UniqueConstraint("source_event_id", name=op.f("uq_ledger_entries_source_event_id")),
    )
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ledger_entries_corrects"), ["corrects"], unique=False)
        batch_op.create_index(
            "ix_ledger_entries_tenant_kind_time", ["tenant_id", "kind", "occurred_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_ledger_entries_tenant_id"), ["tenant_id"], unique=False)
        batch_op.create_index(
            "ix_ledger_entries_tenant_time", ["tenant_id", "occurred_at", "id"], unique=False
        )

    op.create_table(
        "billing_rollups",
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("period", sa.String(length=8), nullable=False),
        sa.Column("bucket", somaagent.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("item", sa.String(length=160), nullable=False),
        sa.Column("key_id", sa.String(length=40), nullable=False),
        sa.Column("subject", sa.String(length=255), nullable=False),
        sa.Column("user_id", sa.String(length=40), nullable=False),
        sa.Column("entries", sa.BigInteger(), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cached_tokens", sa.BigInteger(), nullable=False),
        sa.Column("amount_micros", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "tenant_id",
            "period",
            "bucket",
            "kind",
            "item",
            "key_id",
            "subject",
            "user_id",
            name=op.f("pk_billing_rollups"),
        ),
    )

    # The ledger is append-only: corrections are new rows, never updates.
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            """
            CREATE FUNCTION ledger_entries_append_only() RETURNS trigger AS $$
            BEGIN
                RAISE EXCEPTION 'ledger_entries is append-only';
            END;
            $$ LANGUAGE plpgsql
            """
        )
        op.execute(
            "CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries "
            "FOR EACH ROW EXECUTE FUNCTION ledger_entries_append_only()"
        )
        # Row triggers never see TRUNCATE.
        op.execute(
            "CREATE TRIGGER ledger_entries_no_truncate BEFORE TRUNCATE ON ledger_entries "
            "FOR EACH STATEMENT EXECUTE FUNCTION ledger_entries_append_only()"
        )
    else:
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER ledger_entries_no_{action.lower()} BEFORE {action} ON ledger_entries "
                "BEGIN SELECT RAISE(ABORT, 'ledger_entries is append-only'); END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS ledger_entries_append_only ON ledger_entries")
        op.execute("DROP TRIGGER IF EXISTS ledger_entries_no_truncate ON ledger_entries")
        op.execute("DROP FUNCTION IF EXISTS ledger_entries_append_only()")
    op.drop_table("billing_rollups")
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.drop_index("ix_ledger_entries_tenant_time")
        batch_op.drop_index(batch_op.f("ix_ledger_entries_tenant_id"))
        batch_op.drop_index("ix_ledger_entries_tenant_kind_time")
        batch_op.drop_index(batch_op.f("ix_ledger_entries_corrects"))
    op.drop_table("ledger_entries")
    with op.batch_alter_table("model_prices", schema=None) as batch_op:
        batch_op.drop_column("effective_from")
        batch_op.drop_column("call_micros")
        batch_op.drop_column("cached_micros_per_mtok")
