"""The anomaly baselines: EWMA mean and variance per (tenant, metric), the z-score of a value against
one, and the rows that hold them.

Owns: `METRICS`, `Baseline` (the pure EWMA arithmetic), `std_floor`, `ensure_baselines`.
May import: db, analytics.tables. Never: decides what is an anomaly (analytics/anomalies.py does).

The method: for each closed hour the metric's value x is compared with the baseline as it stood BEFORE
that hour: z = (x - mean) / max(sqrt(variance), floor). Then the baseline takes the hour in:
    d = x - mean;  mean += alpha * d;  variance = (1 - alpha) * (variance + alpha * d * d)
(the exponentially weighted mean and variance; the first sample sets mean = x, variance = 0).
The floor keeps a flat baseline (variance near 0) from flagging noise: it is the larger of an absolute
minimum per metric and a fraction of the baseline mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.analytics.tables import AnomalyBaseline
from somaagent.db.statements import insert_skipping_duplicates

SPEND, ERROR_RATE, P95_LATENCY = "spend", "error_rate", "p95_latency"
METRICS = (SPEND, ERROR_RATE, P95_LATENCY)
# (absolute minimum, fraction of the mean) of the standard deviation, per metric: spend in micro-USD
# (a tenth of a cent, or 10 % of the usual hourly spend), error rate as a fraction (5 points), p95
# latency in ms (50 ms, or a quarter of the usual p95: the histogram resolves a factor of two).
_FLOORS: dict[str, tuple[float, float]] = {
    SPEND: (1_000.0, 0.10),
    ERROR_RATE: (0.05, 0.10),
    P95_LATENCY: (50.0, 0.25),
}


def std_floor(metric: str, mean: float) -> float:
    """The smallest standard deviation a z-score of `metric` divides by."""
    absolute, relative = _FLOORS[metric]
    return max(absolute, relative * abs(mean))


@dataclass(frozen=True, slots=True)
class Baseline:
    """An EWMA baseline: how many hours it has seen, their weighted mean and variance."""

    samples: int = 0
    mean: float = 0.0
    variance: float = 0.0

    def std(self, metric: str) -> float:
        """The standard deviation, never below the metric's floor."""
        return max(math.sqrt(max(self.variance, 0.0)), std_floor(metric, self.mean))

    def z(self, metric: str, value: float) -> float:
        """How many (floored) standard deviations `value` is above the mean."""
        return (value - self.mean) / self.std(metric)

    def taking(self, value: float, alpha: float) -> Baseline:
        """The baseline after one more hour of `value`."""
        if self.samples == 0:
            return Baseline(1, value, 0.0)
        diff = value - self.mean
        return Baseline(
            self.samples + 1,
            self.mean + alpha * diff,
            (1 - alpha) * (self.variance + alpha * diff * diff),
        )


async def ensure_baselines(session: AsyncSession, starts: dict[str, datetime]) -> None:
    """Create the empty baselines of tenants that have none, evaluated through `starts[tenant]` (the
    hour before their first traffic); existing baselines are left as they are."""
    rows: list[dict[str, Any]] = [
        {
            "tenant_id": tenant,
            "metric": metric,
            "samples": 0,
            "mean": 0.0,
            "variance": 0.0,
            "evaluated_through": start,
        }
        for tenant, start in sorted(starts.items())
        for metric in METRICS
    ]
    if rows:
        await session.execute(
            insert_skipping_duplicates(session, AnomalyBaseline, ["tenant_id", "metric"]), rows
        )
