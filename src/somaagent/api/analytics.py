"""The analytics component the app factory builds (the `analytics` consumer group, priced through the
platform's price book, and the anomaly detector's periodic task) and its routes:
`GET /v1/analytics/dashboard`, `/v1/analytics/rollups` and `/v1/analytics/anomalies` (`analytics:read`,
tenant-scoped; operators name a tenant with `?tenant=`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from fastapi import APIRouter

from somaagent.analytics.anomalies import AnomalyDetector, AnomalySettings, usd
from somaagent.analytics.anomaly_state import METRICS
from somaagent.analytics.queries import (
    DIMENSIONS,
    Totals,
    grouped_totals,
    list_anomalies,
    top_names,
    totals_by_kind,
)
from somaagent.analytics.rollups import GROUP, TOPICS, AnalyticsConsumer, hour_of, minute_of
from somaagent.analytics.schemas import (
    AnomalyOut,
    BudgetUseOut,
    CountersOut,
    DashboardOut,
    LatencyOut,
    LatencyWindowsOut,
    LiveOut,
    RollupRowOut,
    RollupsOut,
    SpendOut,
    TopOut,
    TopsOut,
    WindowsOut,
)
from somaagent.analytics.tables import Anomaly
from somaagent.api.billing_params import parse_range
from somaagent.api.composition import Check, Platform, PriceBookPricing
from somaagent.api.deps import AnalyticsReadDep, ServicesDep, SessionDep
from somaagent.api.openai.docs import error_responses
from somaagent.core.clock import utcnow
from somaagent.core.errors import InvalidRequest
from somaagent.core.pagination import ListOut
from somaagent.events.consumers import ConsumerSpec
from somaagent.identity.service import act_for_tenant

router = APIRouter(prefix="/v1/analytics", tags=["Analytics"])

MAX_RANGE = timedelta(days=93)  # a chart reads at most this much (hourly rows) at once
DEFAULT_RANGE = timedelta(hours=24)
TOP = 5
OPEN_FOR = timedelta(hours=24)  # an anomaly is "open" on the dashboard for a day after its hour
MAX_ANOMALIES = 500


@dataclass
class AnalyticsComponent:
    """What the app factory wires: the `analytics` consumer group, readiness checks, and the anomaly
    detector (evaluates closed hours every minute while the app runs)."""

    consumers: list[ConsumerSpec] = field(default_factory=list)
    readiness: list[tuple[str, Check]] = field(default_factory=list)
    detector: AnomalyDetector | None = None

    async def start(self) -> None:
        """Start the anomaly detector's periodic task."""
        if self.detector is not None:
            self.detector.start()

    async def close(self) -> None:
        """Stop it."""
        if self.detector is not None:
            await self.detector.close()


def build_analytics(platform: Platform) -> AnalyticsComponent:
    """The analytics component of this process."""
    settings = platform.settings
    detector = AnomalyDetector(
        platform.sessions,
        AnomalySettings(
            z_threshold=settings.anomaly_z_threshold,
            alpha=settings.anomaly_alpha,
            min_samples=settings.anomaly_min_samples,
        ),
        on_outbox=platform.poke_relay,
    )
    consumer = AnalyticsConsumer(PriceBookPricing(platform.prices))
    return AnalyticsComponent(consumers=[ConsumerSpec(GROUP, TOPICS, consumer)], detector=detector)


# Routes.


def _counters(totals: dict[str, Totals]) -> CountersOut:
    model = totals.get("model", Totals())
    return CountersOut(
        requests=model.count,
        tokens=model.prompt_tokens + model.completion_tokens,
        runs=totals.get("run", Totals()).count,
        tool_calls=totals.get("tool", Totals()).count,
        policy_decisions=totals.get("policy", Totals()).count,
    )


def _latency(totals: Totals) -> LatencyOut:
    return LatencyOut(p50_ms=totals.quantile_ms(0.5), p95_ms=totals.quantile_ms(0.95))


def _top(ranked: list[tuple[str, Totals]]) -> list[TopOut]:
    return [
        TopOut(
            name=name,
            count=t.count,
            errors=t.errors,
            tokens=t.prompt_tokens + t.completion_tokens,
            cost_micros=t.cost_micros,
            p95_ms=t.quantile_ms(0.95),
        )
        for name, t in ranked
    ]


def _anomaly(row: Anomaly) -> AnomalyOut:
    return AnomalyOut(
        id=row.id,
        tenant_id=row.tenant_id,
        metric=row.metric,
        hour=row.hour,
        value=row.value,
        baseline_mean=row.baseline_mean,
        baseline_std=row.baseline_std,
        z=row.z,
        samples=row.samples,
        severity=row.severity,
        notification_id=row.notification_id,
        detected_at=row.detected_at,
    )


@router.get("/dashboard", response_model=DashboardOut, responses=error_responses(400, 401, 404))
async def get_dashboard(
    principal: AnalyticsReadDep, services: ServicesDep, session: SessionDep, tenant: str | None = None
) -> DashboardOut:
    """The one-sight view: live counters, error rate, p50/p95 latency, spend today against the budgets,
    today's busiest models, personas and tools, and the open anomalies."""
    acting = await act_for_tenant(session, principal, tenant)
    await services.catch_up()
    now = utcnow()
    today = hour_of(now).replace(hour=0)
    tenant_id = acting.tenant_id
    recent = await totals_by_kind(session, tenant_id, "minute", minute_of(now) - timedelta(minutes=4))
    last_hour = await totals_by_kind(session, tenant_id, "minute", minute_of(now) - timedelta(minutes=59))
    day = await totals_by_kind(session, tenant_id, "hour", today)
    model_hour, model_day = last_hour.get("model", Totals()), day.get("model", Totals())
    budgets = await services.budgets.list_budgets(session, acting)
    uses = [
        BudgetUseOut(
            id=s.budget.id,
            scope=s.budget.scope,
            scope_id=s.budget.scope_id,
            unit=s.budget.unit,
            period=s.budget.period,
            limit=s.budget.limit,
            spent=s.spent,
            reserved=s.reserved,
            remaining=s.remaining,
            used=round((s.spent + s.reserved) / s.budget.limit, 4) if s.budget.limit else None,
            resets_at=s.resets_at,
        )
        for s in await services.budgets.statuses(budgets)
    ]
    spent = sum(day.get(k, Totals()).cost_micros for k in ("model", "tool"))
    anomalies = await list_anomalies(session, tenant_id, since=hour_of(now) - OPEN_FOR, limit=50)
    return DashboardOut(
        tenant_id=tenant_id,
        generated_at=now,
        live=LiveOut(last_5_minutes=_counters(recent), today=_counters(day)),
        error_rate=WindowsOut(last_hour=model_hour.error_rate, today=model_day.error_rate),
        latency=LatencyWindowsOut(last_hour=_latency(model_hour), today=_latency(model_day)),
        spend=SpendOut(
            today_micros=spent,
            today_usd=usd(spent),
            # A tool without a price is free (most are); a model without one is a gap in the spend.
            unpriced_model_calls_today=model_day.unpriced,
            budgets=uses,
        ),
        top=TopsOut(
            models=_top(await top_names(session, tenant_id, "model", today, TOP)),
            personas=_top(await top_names(session, tenant_id, "run", today, TOP)),
            tools=_top(await top_names(session, tenant_id, "tool", today, TOP)),
        ),
        anomalies=[_anomaly(a) for a in anomalies],
    )


def _range(since: str | None, until: str | None) -> tuple[datetime, datetime]:
    start, end = parse_range(since, until)
    end = end or utcnow()
    start = start or end - DEFAULT_RANGE
    if start >= end:
        raise InvalidRequest("`since` must be earlier than `until` (default: now)", param="since")
    if end - start > MAX_RANGE:
        raise InvalidRequest(
            f"at most {MAX_RANGE.days} days at once; narrow `since`/`until` and page through", param="since"
        )
    return start, end


def _group_by(kind: str, group_by: str) -> list[str]:
    allowed = DIMENSIONS[kind]
    found = [part.strip() for part in group_by.split(",") if part.strip()]
    for dimension in found:
        if dimension not in allowed:
            raise InvalidRequest(
                f"`group_by` {dimension!r} is not a dimension of {kind} rollups; "
                f"use a comma-separated list of {', '.join(allowed)}",
                param="group_by",
            )
    if "hour" in found and "day" in found:
        raise InvalidRequest("group by `hour` or by `day`, not both", param="group_by")
    if len(set(found)) != len(found):
        raise InvalidRequest("`group_by` names a dimension twice", param="group_by")
    return found


@router.get("/rollups", response_model=RollupsOut, responses=error_responses(400, 401, 404))
async def get_rollups(
    principal: AnalyticsReadDep,
    services: ServicesDep,
    session: SessionDep,
    kind: str,
    since: str | None = None,
    until: str | None = None,
    group_by: str = "hour",
    tenant: str | None = None,
) -> RollupsOut:
    """Hourly rollups of one kind for charts: `kind=model|run|tool|policy`, `[since, until)` (RFC 3339
    or a date; default the last 24 hours, at most 93 days), grouped by a comma-separated `group_by`
    (`hour` or `day`, plus `model` / `persona`,`model` / `tool` / `action`; empty: one total)."""
    if kind not in DIMENSIONS:
        raise InvalidRequest(f"`kind` must be one of {', '.join(DIMENSIONS)}, not {kind!r}", param="kind")
    dimensions = _group_by(kind, group_by)
    start, end = _range(since, until)
    acting = await act_for_tenant(session, principal, tenant)
    await services.catch_up()
    groups = await grouped_totals(session, acting.tenant_id, kind, start, end, dimensions)
    return RollupsOut(
        tenant_id=acting.tenant_id,
        kind=kind,
        group_by=dimensions,
        since=start,
        until=end,
        data=[
            RollupRowOut(
                group={k: str(v) for k, v in g.group.items()},
                count=g.totals.count,
                errors=g.totals.errors,
                error_rate=g.totals.error_rate,
                prompt_tokens=g.totals.prompt_tokens,
                completion_tokens=g.totals.completion_tokens,
                cached_tokens=g.totals.cached_tokens,
                cost_micros=g.totals.cost_micros,
                cost_usd=usd(g.totals.cost_micros),
                unpriced=g.totals.unpriced,
                avg_ms=g.totals.avg_ms,
                p50_ms=g.totals.quantile_ms(0.5),
                p95_ms=g.totals.quantile_ms(0.95),
            )
            for g in groups
        ],
    )


@router.get("/anomalies", response_model=ListOut[AnomalyOut], responses=error_responses(400, 401, 404))
async def get_anomalies(
    principal: AnalyticsReadDep,
    session: SessionDep,
    since: str | None = None,
    until: str | None = None,
    metric: str | None = None,
    limit: int = 100,
    tenant: str | None = None,
) -> ListOut[AnomalyOut]:
    """The tenant's anomalies, newest hour first: flagged hours in `[since, until)` (RFC 3339 or a
    date), of one `metric` (`spend`, `error_rate`, `p95_latency`) or all, at most `limit` (1-500)."""
    if metric is not None and metric not in METRICS:
        raise InvalidRequest(f"`metric` must be one of {', '.join(METRICS)}, not {metric!r}", param="metric")
    if not 1 <= limit <= MAX_ANOMALIES:
        raise InvalidRequest(f"`limit` must be between 1 and {MAX_ANOMALIES}, not {limit}", param="limit")
    start, end = parse_range(since, until)
    acting = await act_for_tenant(session, principal, tenant)
    rows = await list_anomalies(session, acting.tenant_id, since=start, until=end, metric=metric, limit=limit)
    return ListOut(data=[_anomaly(a) for a in rows])
