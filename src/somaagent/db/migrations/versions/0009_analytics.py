"""analytics: rollups, baselines, anomalies

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 19:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import somaagent.db.base

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# The duration histogram's columns (analytics/histogram.py: 22 log-scale buckets), written out here
# so this migration never changes when that module does.
_HISTOGRAM = tuple(f"h{i:02d}" for i in range(22))


def upgrade() -> None:
    op.create_table(
        "analytics_rollups",
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("period", sa.String(length=8), nullable=False),
        sa.Column("bucket", somaagent.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("name", sa.String(length=160), nullable=False),
        sa.Column("detail", sa.String(length=160), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cached_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost_micros", sa.BigInteger(), nullable=False),
        sa.Column("unpriced", sa.BigInteger(), nullable=False),
        sa.Column("duration_us_sum", sa.BigInteger(), nullable=False),
        *(sa.Column(name, sa.BigInteger(), nullable=False) for name in _HISTOGRAM),
        sa.PrimaryKeyConstraint(
            "tenant_id", "period", "bucket", "kind", "name", "detail", name=op.f("pk_analytics_rollups")
        ),
    )
    with op.batch_alter_table("analytics_rollups", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_analytics_rollups_tenant_id"), ["tenant_id"], unique=False)

    op.create_table(
        "analytics_baselines",
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("metric", sa.String(length=16), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("mean", sa.Float(), nullable=False),
        sa.Column("variance", sa.Float(), nullable=False),
        sa.Column("evaluated_through", somaagent.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "metric", name=op.f("pk_analytics_baselines")),
    )
    with op.batch_alter_table("analytics_baselines", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_analytics_baselines_tenant_id"), ["tenant_id"], unique=False)

    op.create_table(
        "analytics_anomalies",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("metric", sa.String(length=16), nullable=False),
        sa.Column("hour", somaagent.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("baseline_mean", sa.Float(), nullable=False),
        sa.Column("baseline_std", sa.Float(), nullable=False),
        sa.Column("z", sa.Float(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("notification_id", sa.String(length=40), nullable=False),
        sa.Column("detected_at", somaagent.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_analytics_anomalies")),
        sa.UniqueConstraint("tenant_id", "metric", "hour", name="uq_analytics_anomalies_tenant_metric_hour"),
    )
    with op.batch_alter_table("analytics_anomalies", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_analytics_anomalies_tenant_id"), ["tenant_id"], unique=False)
        batch_op.create_index("ix_analytics_anomalies_tenant_hour", ["tenant_id", "hour"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("analytics_anomalies", schema=None) as batch_op:
        batch_op.drop_index("ix_analytics_anomalies_tenant_hour")
        batch_op.drop_index(batch_op.f("ix_analytics_anomalies_tenant_id"))
    op.drop_table("analytics_anomalies")
    with op.batch_alter_table("analytics_baselines", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_analytics_baselines_tenant_id"))
    op.drop_table("analytics_baselines")
    with op.batch_alter_table("analytics_rollups", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_analytics_rollups_tenant_id"))
    op.drop_table("analytics_rollups")
