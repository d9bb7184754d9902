"""Anomaly detection below HTTP, on SQLite and PostgreSQL: hours of real events after a stable baseline,
then a spike in spend, error rate and p95 latency, is flagged (z against the baseline before the hour);
nothing is flagged before `anomaly_min_samples` hours; each anomaly is stored and staged as exactly one
notification however often, and by however many evaluators at once, the hours are evaluated."""

from __future__ import annotations

import asyncio
import secrets
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select

from somaagent.analytics.anomalies import FoundAnomaly
from somaagent.analytics.queries import list_anomalies
from somaagent.analytics.rollups import hour_of
from somaagent.analytics.tables import AnomalyBaseline
from somaagent.core.clock import utcnow
from somaagent.events.notices import notification_id
from somaagent.events.schemas import NOTIFICATIONS_OUTBOUND, Event
from somaagent.events.tables import OutboxEvent
from somaagent.policy.prices import PriceBook
from tests.analytics.support import (
    OPERATOR_PRINCIPAL,
    Sessions,
    analytics_spec,
    deliver,
    detector,
    usage_event,
)

on_session_loop = pytest.mark.asyncio(loop_scope="session")
HOUR = timedelta(hours=1)
# Per call: 1000 prompt + 500 completion tokens at 1 and 2 micro-USD each, plus 5 per call = 2005.
CALL_MICROS = 2005


async def priced_model(sessions: Sessions) -> str:
    model = f"m-{secrets.token_hex(4)}"
    async with sessions() as session:
        await PriceBook(sessions, 1.0).set_price(
            session, OPERATOR_PRINCIPAL, model, 1_000_000, 2_000_000, call_micros=5
        )
        await session.commit()
    return model


def hour_of_calls(
    tenant: str, model: str, start: datetime, calls: int, *, errors: int = 0, latency_ms: int = 100
) -> list[Event]:
    """`calls` model calls inside the hour from `start` (the last `errors` of them failed)."""
    return [
        usage_event(
            tenant,
            model,
            occurred_at=start + timedelta(minutes=1 + i % 50),
            prompt=1000,
            completion=500,
            latency_ms=latency_ms + (i % 7) * 5,
            status="upstream_error" if i >= calls - errors else "ok",
        )
        for i in range(calls)
    ]


async def notifications(sessions: Sessions, tenant: str) -> list[OutboxEvent]:
    async with sessions() as session:
        return list(
            (
                await session.scalars(
                    select(OutboxEvent).where(
                        OutboxEvent.topic == NOTIFICATIONS_OUTBOUND, OutboxEvent.tenant_id == tenant
                    )
                )
            ).all()
        )


async def history(sessions: Sessions, stable_hours: int) -> tuple[str, str, datetime]:
    """A tenant with `stable_hours` of steady traffic (9 to 11 calls an hour, no errors, ~115 ms), then
    one hour of 100 calls, 30 failing, at ~5 s. The hours are after now: prices apply only from now on."""
    tenant, model = f"ten_{secrets.token_hex(6)}", await priced_model(sessions)
    first = hour_of(utcnow()) + HOUR
    spec = analytics_spec(sessions)
    for h in range(stable_hours):
        await deliver(sessions, spec, hour_of_calls(tenant, model, first + h * HOUR, 9 + h % 3))
    spike = first + stable_hours * HOUR
    await deliver(sessions, spec, hour_of_calls(tenant, model, spike, 100, errors=30, latency_ms=5000))
    return tenant, model, spike


@on_session_loop
async def test_a_spike_after_a_stable_baseline_is_flagged_and_notified_once(sessions: Sessions) -> None:
    tenant, _model, spike = await history(sessions, stable_hours=8)
    pokes: list[int] = []
    evaluator = detector(sessions, pokes)
    after = spike + HOUR + timedelta(minutes=5)  # the spike's hour has closed (and the grace passed)

    found = [a for a in await evaluator.evaluate_closed_hours(after) if a.tenant_id == tenant]
    assert {a.metric for a in found} == {"spend", "error_rate", "p95_latency"}
    assert {a.hour for a in found} == {spike}
    by_metric = {a.metric: a for a in found}
    spend = by_metric["spend"]
    assert spend.value == 70 * CALL_MICROS + 30 * (CALL_MICROS - 5)
    assert 9 * CALL_MICROS <= spend.baseline_mean <= 11 * CALL_MICROS
    assert spend.z >= 3.0 and spend.severity == "error"  # z ≥ twice the threshold
    assert by_metric["error_rate"].value == pytest.approx(0.3) and by_metric["error_rate"].baseline_mean == 0
    assert by_metric["p95_latency"].value >= 4096 and by_metric["p95_latency"].baseline_mean < 256
    assert all(a.samples == 8 for a in found)

    staged = await notifications(sessions, tenant)
    assert len(staged) == 3 and pokes
    for event in staged:
        anomaly = by_metric[event.data["metadata"]["metric"]]
        assert event.type == "notification.requested"
        assert event.data["kind"] == f"anomaly.{anomaly.metric}"
        assert event.data["severity"] == anomaly.severity
        assert event.data["notification_id"] == notification_id(
            tenant, f"anomaly:{anomaly.metric}:{spike.isoformat()}"
        )
        assert event.data["metadata"] == {
            "metric": anomaly.metric,
            "hour": spike.isoformat(),
            "value": anomaly.value,
            "baseline": anomaly.baseline_mean,
            "z": round(anomaly.z, 3),
        }
        assert "standard deviations above the baseline" in event.data["message"]

    # Evaluated again (the same pass, then later ones): nothing new is stored or staged.
    assert [a for a in await evaluator.evaluate_closed_hours(after) if a.tenant_id == tenant] == []
    later = await evaluator.evaluate_closed_hours(after + 3 * HOUR)
    assert [a for a in later if a.tenant_id == tenant] == []
    assert len(await notifications(sessions, tenant)) == 3
    async with sessions() as session:
        stored = await list_anomalies(session, tenant)
        assert sorted(a.metric for a in stored) == ["error_rate", "p95_latency", "spend"]
        baselines = {
            b.metric: b
            for b in await session.scalars(select(AnomalyBaseline).where(AnomalyBaseline.tenant_id == tenant))
        }
    # Quiet hours after the spike: spend took them in as zeros; error rate and latency did not.
    assert baselines["spend"].samples == 8 + 1 + 3
    assert baselines["error_rate"].samples == baselines["p95_latency"].samples == 9
    assert {b.evaluated_through for b in baselines.values()} == {spike + 3 * HOUR}  # the last closed hour


@on_session_loop
async def test_nothing_is_flagged_before_the_baseline_has_min_samples(sessions: Sessions) -> None:
    tenant, _model, spike = await history(sessions, stable_hours=4)  # 4 < anomaly_min_samples (6)
    found = await detector(sessions).evaluate_closed_hours(spike + 2 * HOUR + timedelta(minutes=5))
    assert [a for a in found if a.tenant_id == tenant] == []
    assert await notifications(sessions, tenant) == []
    async with sessions() as session:
        assert await list_anomalies(session, tenant) == []
        spend = await session.get(AnomalyBaseline, {"tenant_id": tenant, "metric": "spend"})
    assert spend is not None and spend.samples == 4 + 1 + 1  # the spike and the quiet hour after it
    # The same history with a lower bar flags it: the spike itself was there to find.
    other, _, spike2 = await history(sessions, stable_hours=4)
    lower = await detector(sessions, min_samples=4).evaluate_closed_hours(
        spike2 + HOUR + timedelta(minutes=5)
    )
    assert {a.metric for a in lower if a.tenant_id == other} == {"spend", "error_rate", "p95_latency"}


@on_session_loop
async def test_racing_evaluators_store_and_notify_each_anomaly_once(sessions: Sessions) -> None:
    tenant, _model, spike = await history(sessions, stable_hours=7)
    after = spike + HOUR + timedelta(minutes=5)
    results = await asyncio.gather(*(detector(sessions).evaluate_closed_hours(after) for _ in range(4)))
    mine: list[FoundAnomaly] = [a for found in results for a in found if a.tenant_id == tenant]
    assert sorted(a.metric for a in mine) == ["error_rate", "p95_latency", "spend"]
    assert len(await notifications(sessions, tenant)) == 3
    async with sessions() as session:
        assert len(await list_anomalies(session, tenant)) == 3
