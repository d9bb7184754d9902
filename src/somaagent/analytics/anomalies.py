"""Anomaly detection: each tenant's closed hours of spend, error rate and p95 latency, compared with
their EWMA baselines (analytics/anomaly_state.py); a flagged hour is stored and staged as a
notification in the transaction that moves the baseline past it.

Owns: `AnomalySettings`, `AnomalyDetector` (`evaluate_closed_hours`, the periodic task, the pruning of
old per-minute rows), `FoundAnomaly`. May import: core, db, events, analytics.
Never: evaluates an hour twice: the baseline moves forward by compare-and-set, and anomalies are unique
by (tenant, metric, hour), so replicas racing agree and notify once.

What counts as a sample: an hour with no traffic is a spend of 0 (a sample). Error rate and p95 latency
(of model calls) are samples only for hours with at least `min_requests` calls: a quiet hour says
nothing about them, so it neither moves their baseline nor is flagged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.analytics.anomaly_state import ERROR_RATE, P95_LATENCY, SPEND, Baseline
from somaagent.analytics.histogram import BUCKETS, COLUMNS, percentile
from somaagent.analytics.rollups import hour_of
from somaagent.analytics.tables import AnalyticsRollup, Anomaly, AnomalyBaseline
from somaagent.core.clock import utcnow
from somaagent.core.ids import new_id
from somaagent.core.periodic import Periodic
from somaagent.db.statements import insert_skipping_duplicates
from somaagent.events.notices import notification_event, notification_id
from somaagent.events.outbox import add_event

log = logging.getLogger(__name__)
HOUR = timedelta(hours=1)
MICROS_PER_USD = 1_000_000


@dataclass(frozen=True, slots=True)
class AnomalySettings:
    """How the detector judges: `z_threshold` (flag at z ≥ this; `error` severity at twice it), the EWMA
    `alpha`, the hours a baseline needs first, the calls an hour needs to judge error rate and latency,
    how long after an hour ends it is evaluated (late events), the task's period, how long per-minute
    rollups are kept."""

    z_threshold: float = 3.0
    alpha: float = 0.3
    min_samples: int = 6
    min_requests: int = 5
    grace: timedelta = timedelta(minutes=2)
    interval_s: float = 60.0
    minute_retention: timedelta = timedelta(hours=3)


@dataclass(frozen=True, slots=True)
class FoundAnomaly:
    """An anomaly this evaluation stored (and staged a notification for)."""

    tenant_id: str
    metric: str
    hour: datetime
    value: float
    baseline_mean: float
    baseline_std: float
    z: float
    samples: int
    severity: str
    notification_id: str


def dedupe_key(metric: str, hour: datetime) -> str:
    """The notification's dedupe key: one notification per tenant, metric and hour."""
    return f"anomaly:{metric}:{hour.isoformat()}"


@dataclass(slots=True)
class _Hour:
    """One closed hour of a tenant: what the metrics are computed from."""

    spend: int = 0
    requests: int = 0
    errors: int = 0
    histogram: list[int] | None = None


class _Raced(Exception):
    """Another evaluator moved this tenant's baselines first: its result stands."""


def usd(micros: int) -> str:
    """Micro-USD as an exact USD string (`1234567` → `"1.234567"`)."""
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), MICROS_PER_USD)
    return f"{sign}{whole}.{fraction:06d}"


def _metric_values(hour: _Hour, min_requests: int) -> dict[str, float]:
    values: dict[str, float] = {SPEND: float(hour.spend)}
    if hour.requests >= min_requests:
        values[ERROR_RATE] = hour.errors / hour.requests
        p95 = percentile(hour.histogram or [], 0.95)
        if p95 is not None:
            values[P95_LATENCY] = p95
    return values


def _describe(metric: str, value: float, baseline: Baseline, z: float, hour: datetime) -> str:
    when = hour.strftime("%Y-%m-%d %H:00 UTC")
    if metric == SPEND:
        what = f"spend was ${usd(round(value))} (usually ${usd(round(baseline.mean))})"
    elif metric == P95_LATENCY:
        what = f"p95 latency of model calls was {value:.0f} ms (usually {baseline.mean:.0f} ms)"
    else:
        what = f"the error rate of model calls was {value:.1%} (usually {baseline.mean:.1%})"
    return f"In the hour from {when}, {what}: {z:.1f} standard deviations above the baseline."


class AnomalyDetector:
    """Evaluates closed hours for every tenant with traffic; `on_outbox` asks the relay for a pass after
    a commit that staged notifications."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        settings: AnomalySettings,
        on_outbox: Callable[[], None] | None = None,
    ) -> None:
        self._sessions = sessions
        self._settings = settings
        self._on_outbox = on_outbox
        self._periodic = Periodic(
            "anomaly evaluation", self._pass, settings.interval_s, log=log, first_at_once=True
        )

    async def evaluate_closed_hours(self, now: datetime | None = None) -> list[FoundAnomaly]:
        """Evaluate, for every tenant, each hour that closed (at least `grace` before `now`) since its
        baselines last moved; returns the anomalies this call stored (none for hours another evaluator
        already took)."""
        now = now or utcnow()
        last_closed = hour_of(now - self._settings.grace) - HOUR
        async with self._sessions() as session:
            tenants = list(
                (
                    await session.scalars(
                        select(AnomalyBaseline.tenant_id)
                        .where(AnomalyBaseline.evaluated_through < last_closed)
                        .distinct()
                        .order_by(AnomalyBaseline.tenant_id)
                    )
                ).all()
            )
        found: list[FoundAnomaly] = []
        for tenant_id in tenants:
            try:
                found.extend(await self._evaluate_tenant(tenant_id, last_closed, now))
            except _Raced:
                continue  # another replica took these hours: its anomalies stand
            except DBAPIError as exc:  # a lock or serialization failure: the next pass retries
                log.warning("anomaly evaluation of tenant %s deferred: %s", tenant_id, exc.orig)
        if found and self._on_outbox is not None:
            self._on_outbox()
        return found

    async def _evaluate_tenant(
        self, tenant_id: str, last_closed: datetime, now: datetime
    ) -> list[FoundAnomaly]:
        settings = self._settings
        async with self._sessions() as session, session.begin():
            rows = {
                r.metric: r
                for r in await session.scalars(
                    select(AnomalyBaseline).where(AnomalyBaseline.tenant_id == tenant_id)
                )
            }
            if not rows:
                return []
            through = min(r.evaluated_through for r in rows.values())
            if through >= last_closed:
                return []
            hours = await _closed_hours(session, tenant_id, through + HOUR, last_closed)
            baselines = {m: Baseline(r.samples, r.mean, r.variance) for m, r in rows.items()}
            flagged: list[FoundAnomaly] = []
            hour = through + HOUR
            while hour <= last_closed:
                for metric, value in _metric_values(hours.get(hour, _Hour()), settings.min_requests).items():
                    baseline = baselines.get(metric)
                    if baseline is None:
                        continue
                    if baseline.samples >= settings.min_samples:
                        z = baseline.z(metric, value)
                        if z >= settings.z_threshold:
                            flagged.append(self._anomaly(tenant_id, metric, hour, value, baseline, z))
                    baselines[metric] = baseline.taking(value, settings.alpha)
                hour += HOUR
            for metric, row in rows.items():
                moved = await session.execute(
                    update(AnomalyBaseline)
                    .where(
                        AnomalyBaseline.tenant_id == tenant_id,
                        AnomalyBaseline.metric == metric,
                        AnomalyBaseline.evaluated_through == row.evaluated_through,
                    )
                    .values(
                        samples=baselines[metric].samples,
                        mean=baselines[metric].mean,
                        variance=baselines[metric].variance,
                        evaluated_through=last_closed,
                    )
                    .execution_options(synchronize_session=False)
                )
                if getattr(moved, "rowcount", 0) != 1:
                    raise _Raced(tenant_id)
            return await _store(session, flagged, now)

    def _anomaly(
        self, tenant_id: str, metric: str, hour: datetime, value: float, baseline: Baseline, z: float
    ) -> FoundAnomaly:
        severity = "error" if z >= 2 * self._settings.z_threshold else "warning"
        return FoundAnomaly(
            tenant_id,
            metric,
            hour,
            value,
            baseline.mean,
            baseline.std(metric),
            z,
            baseline.samples,
            severity,
            notification_id(tenant_id, dedupe_key(metric, hour)),
        )

    async def prune_minutes(self, now: datetime | None = None) -> int:
        """Delete per-minute rollups older than the retention (the live counters read only recent ones)."""
        cutoff = (now or utcnow()) - self._settings.minute_retention
        async with self._sessions() as session, session.begin():
            result = await session.execute(
                delete(AnalyticsRollup).where(
                    AnalyticsRollup.period == "minute", AnalyticsRollup.bucket < cutoff
                )
            )
        return int(getattr(result, "rowcount", 0) or 0)

    def start(self) -> None:
        """Evaluate every `interval_s` in the background."""
        self._periodic.start()

    async def close(self) -> None:
        """Stop the background task."""
        await self._periodic.close()

    async def _pass(self) -> None:
        await self.evaluate_closed_hours()
        await self.prune_minutes()


async def _closed_hours(
    session: AsyncSession, tenant_id: str, first: datetime, last: datetime
) -> dict[datetime, _Hour]:
    """Spend (model and tool calls), model calls, errors and the latency histogram per hour."""
    table = AnalyticsRollup.__table__.c
    query = (
        select(
            table.bucket,
            table.kind,
            func.sum(table.cost_micros),
            func.sum(table.count),
            func.sum(table.errors),
            *(func.sum(table[c]) for c in COLUMNS),
        )
        .where(
            table.tenant_id == tenant_id,
            table.period == "hour",
            table.kind.in_(("model", "tool")),
            table.bucket >= first,
            table.bucket <= last,
        )
        .group_by(table.bucket, table.kind)
    )
    hours: dict[datetime, _Hour] = {}
    for bucket, kind, cost, count, errors, *histogram in (await session.execute(query)).all():
        hour = hours.setdefault(hour_of(bucket), _Hour())
        hour.spend += int(cost or 0)
        if kind == "model":
            hour.requests = int(count or 0)
            hour.errors = int(errors or 0)
            hour.histogram = [int(v or 0) for v in histogram] if histogram else [0] * BUCKETS
    return hours


async def _store(session: AsyncSession, flagged: list[FoundAnomaly], now: datetime) -> list[FoundAnomaly]:
    """Insert the anomalies not stored yet and stage one notification for each inserted."""
    stored: list[FoundAnomaly] = []
    for anomaly in flagged:
        inserted = await session.scalar(
            insert_skipping_duplicates(session, Anomaly, ["tenant_id", "metric", "hour"])
            .values(
                id=new_id("anm"),
                tenant_id=anomaly.tenant_id,
                metric=anomaly.metric,
                hour=anomaly.hour,
                value=anomaly.value,
                baseline_mean=anomaly.baseline_mean,
                baseline_std=anomaly.baseline_std,
                z=anomaly.z,
                samples=anomaly.samples,
                severity=anomaly.severity,
                notification_id=anomaly.notification_id,
                detected_at=now,
            )
            .returning(Anomaly.id)
        )
        if inserted is None:
            continue
        stored.append(anomaly)
        add_event(
            session,
            notification_event(
                anomaly.tenant_id,
                kind=f"anomaly.{anomaly.metric}",
                severity="error" if anomaly.severity == "error" else "warning",
                message=_describe(
                    anomaly.metric,
                    anomaly.value,
                    Baseline(0, anomaly.baseline_mean, 0.0),
                    anomaly.z,
                    anomaly.hour,
                ),
                metadata={
                    "metric": anomaly.metric,
                    "hour": anomaly.hour.isoformat(),
                    "value": anomaly.value,
                    "baseline": anomaly.baseline_mean,
                    "z": round(anomaly.z, 3),
                },
                dedupe_key=dedupe_key(anomaly.metric, anomaly.hour),
            ),
        )
    return stored
