"""Analytics tables: usage records (one row per model call), the hourly and per-minute rollups the
dashboard reads, the anomaly baselines and the anomalies found.

Owns: usage_records, analytics_rollups, analytics_baselines, analytics_anomalies.
May import: db, analytics.histogram. Never: another domain's tables.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Float, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from somaagent.analytics.histogram import COLUMNS
from somaagent.db.base import Base, TenantMixin, UTCDateTime


class UsageRecord(TenantMixin, Base):
    """One row per model call, written by the `usage` consumer (idempotent by event id)."""

    __tablename__ = "usage_records"
    __table_args__ = (Index("ix_usage_records_tenant_day", "tenant_id", "day"),)

    event_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64))  # a client's X-Request-Id may be 64
    key_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    model: Mapped[str] = mapped_column(String(256))  # what the OpenAI routes accept
    kind: Mapped[str] = mapped_column(String(16))  # "chat" | "embedding"
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    latency_ms: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(32))
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime())
    day: Mapped[str] = mapped_column(String(10))  # YYYY-MM-DD (UTC), the rollup key


# The counters of a rollup row, summed by every writer and reader (the histogram's columns follow them).
COUNTERS = (
    "count",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cost_micros",
    "unpriced",
    "duration_us_sum",
)


class AnalyticsRollup(TenantMixin, Base):
    """Counters of one tenant's model calls, runs, tool calls or policy decisions in one bucket.

    `period` is `hour` (kept; one row per name and detail) or `minute` (the live counters: one row per
    kind with empty name and detail, pruned after a few hours). `name` is the model, persona, tool or
    policy action; `detail` is the model of a run (empty otherwise). `count` is requests, runs, calls or
    decisions; `errors` is errors, failed runs, failed calls or denials. `h00`…`h21` count durations in
    the log-scale buckets of `analytics/histogram.py`. Every counter only ever grows, by atomic upserts.
    """

    __tablename__ = "analytics_rollups"

    tenant_id: Mapped[str] = mapped_column(String(40), primary_key=True, index=True)
    period: Mapped[str] = mapped_column(String(8), primary_key=True)
    bucket: Mapped[datetime] = mapped_column(UTCDateTime(), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8), primary_key=True)
    name: Mapped[str] = mapped_column(String(160), primary_key=True)
    detail: Mapped[str] = mapped_column(String(160), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)
    errors: Mapped[int] = mapped_column(BigInteger)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)
    cached_tokens: Mapped[int] = mapped_column(BigInteger)
    cost_micros: Mapped[int] = mapped_column(BigInteger)
    unpriced: Mapped[int] = mapped_column(BigInteger)  # calls no price was in force for
    duration_us_sum: Mapped[int] = mapped_column(BigInteger)
    # The histogram columns, one per bucket (the layout is histogram.py's, in one place).
    for _column in COLUMNS:
        vars()[_column] = mapped_column(BigInteger, nullable=False)
    del _column


class AnomalyBaseline(TenantMixin, Base):
    """The EWMA baseline of one tenant's metric (`spend`, `error_rate`, `p95_latency`), and the last
    closed hour folded into it (`evaluated_through`: the start of that hour). The evaluator moves
    `evaluated_through` forward with a compare-and-set, so replicas never evaluate an hour twice."""

    __tablename__ = "analytics_baselines"

    tenant_id: Mapped[str] = mapped_column(String(40), primary_key=True, index=True)
    metric: Mapped[str] = mapped_column(String(16), primary_key=True)
    samples: Mapped[int] = mapped_column(Integer)
    # Statistics of the metric (micro-USD, a rate or ms), not amounts: floats by nature.
    mean: Mapped[float] = mapped_column(Float)
    variance: Mapped[float] = mapped_column(Float)
    evaluated_through: Mapped[datetime] = mapped_column(UTCDateTime())


class Anomaly(TenantMixin, Base):
    """One flagged hour of one metric: its value, the baseline it was compared with, and the z-score.
    At most one per (tenant, metric, hour), whoever evaluated it."""

    __tablename__ = "analytics_anomalies"
    __table_args__ = (
        UniqueConstraint("tenant_id", "metric", "hour", name="uq_analytics_anomalies_tenant_metric_hour"),
        Index("ix_analytics_anomalies_tenant_hour", "tenant_id", "hour"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    metric: Mapped[str] = mapped_column(String(16))
    hour: Mapped[datetime] = mapped_column(UTCDateTime())
    value: Mapped[float] = mapped_column(Float)
    baseline_mean: Mapped[float] = mapped_column(Float)
    baseline_std: Mapped[float] = mapped_column(Float)
    z: Mapped[float] = mapped_column(Float)
    samples: Mapped[int] = mapped_column(Integer)
    severity: Mapped[str] = mapped_column(String(16))
    notification_id: Mapped[str] = mapped_column(String(40))
    detected_at: Mapped[datetime] = mapped_column(UTCDateTime())
