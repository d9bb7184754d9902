"""Reading the rollups and anomalies of one tenant: totals over a time range, groups for charts, the
top names of a kind, and the anomalies stored. Every query filters on the tenant.

Owns: `Totals`, `GroupedTotals`, `totals_by_kind`, `grouped_totals`, `top_names`, `list_anomalies`,
`DIMENSIONS`. May import: db, analytics. Never: writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.analytics.histogram import BUCKETS, COLUMNS, percentile
from somaagent.analytics.tables import COUNTERS, AnalyticsRollup, Anomaly

# The dimensions a chart of each kind may group by, and the rollup column each one reads
# (`hour` and `day` are the bucket).
DIMENSIONS: dict[str, dict[str, str]] = {
    "model": {"hour": "bucket", "day": "bucket", "model": "name"},
    "run": {"hour": "bucket", "day": "bucket", "persona": "name", "model": "detail"},
    "tool": {"hour": "bucket", "day": "bucket", "tool": "name"},
    "policy": {"hour": "bucket", "day": "bucket", "action": "name"},
}


@dataclass(slots=True)
class Totals:
    """Summed counters of some rollup rows (see `AnalyticsRollup` for what each means per kind)."""

    count: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_micros: int = 0
    unpriced: int = 0
    duration_us_sum: int = 0
    histogram: list[int] = field(default_factory=lambda: [0] * BUCKETS)

    def add(self, values: Sequence[Any]) -> None:
        """Add one result row: the `COUNTERS` values, then the histogram."""
        for name, value in zip(COUNTERS, values[: len(COUNTERS)], strict=True):
            setattr(self, name, getattr(self, name) + int(value or 0))
        for i, value in enumerate(values[len(COUNTERS) :]):
            self.histogram[i] += int(value or 0)

    @property
    def error_rate(self) -> float | None:
        """Errors per call; None without calls."""
        return self.errors / self.count if self.count else None

    @property
    def timed(self) -> int:
        """How many durations the histogram counts."""
        return sum(self.histogram)

    @property
    def avg_ms(self) -> float | None:
        """Mean duration in ms; None when nothing was timed."""
        return round(self.duration_us_sum / 1000 / self.timed, 3) if self.timed else None

    def quantile_ms(self, q: float) -> float | None:
        """The q-quantile of the durations, from the histogram (within one bucket of the truth)."""
        found = percentile(self.histogram, q)
        return round(found, 3) if found is not None else None


@dataclass(frozen=True, slots=True)
class GroupedTotals:
    """One group of a chart: the dimension values (`hour`/`day` as the bucket) and its totals."""

    group: dict[str, Any]
    totals: Totals


def _sums() -> list[Any]:
    c = AnalyticsRollup.__table__.c
    return [func.sum(c[name]) for name in (*COUNTERS, *COLUMNS)]


async def totals_by_kind(
    session: AsyncSession, tenant_id: str, period: str, since: datetime, until: datetime | None = None
) -> dict[str, Totals]:
    """Totals per kind of the tenant's `period` (`hour` or `minute`) rows with bucket in [since, until)."""
    c = AnalyticsRollup.__table__.c
    query = (
        select(c.kind, *_sums())
        .where(c.tenant_id == tenant_id, c.period == period, c.bucket >= since)
        .group_by(c.kind)
    )
    if until is not None:
        query = query.where(c.bucket < until)
    found: dict[str, Totals] = {}
    for kind, *values in (await session.execute(query)).all():
        found.setdefault(str(kind), Totals()).add(values)
    return found


async def grouped_totals(
    session: AsyncSession,
    tenant_id: str,
    kind: str,
    since: datetime,
    until: datetime,
    group_by: Sequence[str],
) -> list[GroupedTotals]:
    """The tenant's hourly rows of `kind` in [since, until), grouped by `group_by` (names from
    `DIMENSIONS[kind]`), in group order; `day` groups are summed from the hours."""
    c = AnalyticsRollup.__table__.c
    columns = list(dict.fromkeys(DIMENSIONS[kind][d] for d in group_by))
    query = (
        select(*(c[name] for name in columns), *_sums())
        .where(
            c.tenant_id == tenant_id,
            c.period == "hour",
            c.kind == kind,
            c.bucket >= since,
            c.bucket < until,
        )
        .group_by(*(c[name] for name in columns))
    )
    groups: dict[tuple[Any, ...], GroupedTotals] = {}
    for row in (await session.execute(query)).all():
        by_column = dict(zip(columns, row[: len(columns)], strict=True))
        group: dict[str, Any] = {}
        for dimension in group_by:
            value = by_column[DIMENSIONS[kind][dimension]]
            if dimension == "hour":
                value = value.strftime("%Y-%m-%dT%H:00:00Z")
            elif dimension == "day":
                value = value.date().isoformat()
            group[dimension] = value
        key = tuple(group.values())
        entry = groups.get(key)
        if entry is None:
            entry = groups[key] = GroupedTotals(group, Totals())
        entry.totals.add(row[len(columns) :])
    return [groups[key] for key in sorted(groups, key=lambda k: tuple(str(v) for v in k))]


async def top_names(
    session: AsyncSession, tenant_id: str, kind: str, since: datetime, limit: int
) -> list[tuple[str, Totals]]:
    """The `limit` names of `kind` with the most calls since `since` (ties by name)."""
    c = AnalyticsRollup.__table__.c
    query = (
        select(c.name, *_sums())
        .where(c.tenant_id == tenant_id, c.period == "hour", c.kind == kind, c.bucket >= since)
        .group_by(c.name)
    )
    found: dict[str, Totals] = {}
    for name, *values in (await session.execute(query)).all():
        found.setdefault(str(name), Totals()).add(values)
    ranked = sorted(found.items(), key=lambda item: (-item[1].count, item[0]))
    return ranked[:limit]


async def list_anomalies(
    session: AsyncSession,
    tenant_id: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    metric: str | None = None,
    limit: int = 100,
) -> list[Anomaly]:
    """The tenant's anomalies, newest hour first; hours in [since, until)."""
    query = select(Anomaly).where(Anomaly.tenant_id == tenant_id)
    if since is not None:
        query = query.where(Anomaly.hour >= since)
    if until is not None:
        query = query.where(Anomaly.hour < until)
    if metric is not None:
        query = query.where(Anomaly.metric == metric)
    query = query.order_by(Anomaly.hour.desc(), Anomaly.metric).limit(limit)
    return list((await session.scalars(query)).all())
