"""analytics: usage records hold every request id and model name a `model.usage` event can carry

A client's `X-Request-Id` may be 64 characters and a model name 256 (what the OpenAI routes accept), but
`usage_records` took 40 and 128: on PostgreSQL the longer ones failed the insert and the event was
dead-lettered for the `usage` group, so `/v1/usage` under-counted.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03 14:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.alter_column("request_id", existing_type=sa.String(length=40), type_=sa.String(length=64))
        batch_op.alter_column("model", existing_type=sa.String(length=128), type_=sa.String(length=256))


def downgrade() -> None:
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.alter_column("model", existing_type=sa.String(length=256), type_=sa.String(length=128))
        batch_op.alter_column("request_id", existing_type=sa.String(length=64), type_=sa.String(length=40))
