"""The `analytics` consumer below HTTP, on SQLite and PostgreSQL: real events (producers' shapes, past
and present) delivered through the consumer runner give exact hourly and per-minute rollups, priced at
the version in force; a redelivery or a repeat inside a batch counts once; percentiles read from the
histograms are within one bucket of the truth; concurrent deliveries (replicas) never lose a count."""

from __future__ import annotations

import asyncio
import random
import secrets
from datetime import timedelta

import pytest
from sqlalchemy import select

from somaagent.analytics.histogram import COLUMNS, bucket_of
from somaagent.analytics.queries import grouped_totals
from somaagent.analytics.rollups import hour_of, minute_of
from somaagent.analytics.tables import AnomalyBaseline
from somaagent.core.clock import utcnow
from somaagent.events.runner import ConsumerRunner
from somaagent.events.schemas import Event
from somaagent.policy.prices import PriceBook
from tests.analytics.support import (
    OPERATOR_PRINCIPAL,
    Sessions,
    analytics_spec,
    deliver,
    detector,
    policy_event,
    rollup_rows,
    run_event,
    tool_event,
    usage_event,
)

on_session_loop = pytest.mark.asyncio(loop_scope="session")
ZERO = {c: 0 for c in COLUMNS}


def histogram(**counts: int) -> dict[str, int]:
    return {**ZERO, **counts}


async def deliver_by_topic(runner: ConsumerRunner, sessions: Sessions, events: list[Event]) -> None:
    spec = analytics_spec(sessions)
    for topic in sorted({e.topic for e in events}):
        await runner.handle_events(spec, topic, [e for e in events if e.topic == topic])


@on_session_loop
async def test_real_events_give_exact_rollups_once(sessions: Sessions) -> None:
    tenant, model, tool = (
        f"ten_{secrets.token_hex(6)}",
        f"m-{secrets.token_hex(4)}",
        f"t{secrets.token_hex(4)}",
    )
    book = PriceBook(sessions, 1.0)
    async with sessions() as session:
        # Micro-USD per million tokens: 1 per prompt token, 0.5 per cached one, 2 per completion token.
        await book.set_price(
            session,
            OPERATOR_PRINCIPAL,
            model,
            1_000_000,
            2_000_000,
            cached_micros_per_mtok=500_000,
            call_micros=5,
        )
        await book.set_price(session, OPERATOR_PRINCIPAL, f"tool:{tool}", 0, 0, call_micros=7)
        await session.commit()
    at = utcnow() + timedelta(seconds=1)
    past = at - timedelta(hours=2)  # before any price: counted, not priced
    events = [
        usage_event(tenant, model, occurred_at=at, latency_ms=0),
        usage_event(tenant, model, occurred_at=at, latency_ms=1),
        usage_event(tenant, model, occurred_at=at, latency_ms=3, cached=4),
        usage_event(tenant, model, occurred_at=at, latency_ms=100),
        usage_event(tenant, model, occurred_at=at, latency_ms=1000, status="upstream_error"),
        usage_event(tenant, "unpriced-x", occurred_at=past, latency_ms=20),
        usage_event(tenant, "unpriced-x", occurred_at=past, latency_ms=20),
        run_event(tenant, "helper", model, "completed", occurred_at=at, duration_ms=1500),
        run_event(tenant, "helper", model, "completed", occurred_at=at, duration_ms=1500),
        run_event(tenant, "helper", model, "failed", occurred_at=at, duration_ms=5000),
        run_event(tenant, None, None, "cancelled", occurred_at=at, duration_ms=10),
        run_event(tenant, "helper", model, "running", occurred_at=at),  # not the end of a run
        tool_event(tenant, tool, occurred_at=at, duration_ms=3.5),
        tool_event(tenant, tool, occurred_at=at, duration_ms=3.5),
        tool_event(tenant, tool, occurred_at=at, duration_ms=40, outcome="timeout"),
        policy_event(tenant, "chat.input", True, occurred_at=at),
        policy_event(tenant, "chat.input", True, occurred_at=at),
        policy_event(tenant, "chat.input", False, occurred_at=at),
    ]
    runner = ConsumerRunner(sessions, attempts=3, on_outbox=lambda: None)
    # A batch that repeats an event, then the whole stream redelivered: each event counts once.
    await deliver_by_topic(runner, sessions, [*events, events[0], events[12]])
    await deliver_by_topic(runner, sessions, events)

    hour, old = hour_of(at), hour_of(past)
    assert await rollup_rows(sessions, tenant) == {
        (hour, "model", model, ""): {
            "count": 5,
            "errors": 1,
            "prompt_tokens": 50,
            "completion_tokens": 25,
            "cached_tokens": 4,
            # 3 plain calls of 10 + 10 + 5; the cached one 6 + 2 + 10 + 5; the failed one no call price.
            "cost_micros": 3 * 25 + 23 + 20,
            "unpriced": 0,
            "duration_us_sum": 1_104_000,
            **histogram(h00=1, h01=1, h02=1, h07=1, h10=1),
        },
        (old, "model", "unpriced-x", ""): {
            "count": 2,
            "errors": 0,
            "prompt_tokens": 20,
            "completion_tokens": 10,
            "cached_tokens": 0,
            "cost_micros": 0,
            "unpriced": 2,
            "duration_us_sum": 40_000,
            **histogram(h05=2),
        },
        (hour, "run", "helper", model): {
            "count": 3,
            "errors": 1,
            "prompt_tokens": 120,
            "completion_tokens": 24,
            "cached_tokens": 0,
            "cost_micros": 0,
            "unpriced": 0,
            "duration_us_sum": 8_000_000,
            **histogram(h11=2, h13=1),
        },
        (hour, "run", "", ""): {
            "count": 1,
            "errors": 0,
            "prompt_tokens": 40,
            "completion_tokens": 8,
            "cached_tokens": 0,
            "cost_micros": 0,
            "unpriced": 0,
            "duration_us_sum": 10_000,
            **histogram(h04=1),
        },
        (hour, "tool", tool, ""): {
            "count": 3,
            "errors": 1,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "cached_tokens": 0,
            "cost_micros": 14,
            "unpriced": 0,
            "duration_us_sum": 47_000,
            **histogram(h02=2, h06=1),
        },
        (hour, "policy", "chat.input", ""): {
            "count": 3,
            "errors": 1,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "cached_tokens": 0,
            "cost_micros": 0,
            "unpriced": 0,
            "duration_us_sum": 0,
            **ZERO,
        },
    }
    minutes = await rollup_rows(sessions, tenant, "minute")
    assert {k: v["count"] for k, v in minutes.items()} == {
        (minute_of(at), "model", "", ""): 5,
        (minute_of(past), "model", "", ""): 2,
        (minute_of(at), "run", "", ""): 4,
        (minute_of(at), "tool", "", ""): 3,
        (minute_of(at), "policy", "", ""): 3,
    }
    assert minutes[(minute_of(at), "model", "", "")]["cost_micros"] == 118
    # The anomaly baselines start the hour before the tenant's first traffic.
    async with sessions() as session:
        baselines = (
            await session.scalars(select(AnomalyBaseline).where(AnomalyBaseline.tenant_id == tenant))
        ).all()
    assert sorted(b.metric for b in baselines) == ["error_rate", "p95_latency", "spend"]
    assert {b.evaluated_through for b in baselines} == {old - timedelta(hours=1)}
    assert {b.samples for b in baselines} == {0}


@on_session_loop
async def test_percentiles_from_the_histograms_are_within_one_bucket(sessions: Sessions) -> None:
    tenant, model = f"ten_{secrets.token_hex(6)}", f"m-{secrets.token_hex(4)}"
    rng = random.Random(6)
    at = utcnow() - timedelta(hours=3)
    latencies = [int(rng.lognormvariate(5.0, 1.2)) for _ in range(2000)]  # median ~150 ms, a long tail
    spec = analytics_spec(sessions)
    for start in range(0, len(latencies), 400):
        batch = [
            usage_event(tenant, model, occurred_at=at, latency_ms=ms) for ms in latencies[start : start + 400]
        ]
        await deliver(sessions, spec, batch)
    async with sessions() as session:
        [group] = await grouped_totals(
            session, tenant, "model", at - timedelta(hours=1), at + timedelta(hours=1), []
        )
    ordered = sorted(latencies)
    assert group.totals.count == len(latencies) == group.totals.timed
    assert group.totals.avg_ms == round(sum(latencies) / len(latencies), 3)
    for q in (0.5, 0.9, 0.95, 0.99):
        true = ordered[int(q * len(ordered)) - 1]
        estimate = group.totals.quantile_ms(q)
        assert estimate is not None
        assert abs(bucket_of(estimate) - bucket_of(true)) <= 1, (q, true, estimate)


@on_session_loop
async def test_concurrent_deliveries_never_lose_a_count(sessions: Sessions) -> None:
    """Replicas: eight handler transactions at once, all adding to the same rollup rows."""
    tenant, model = f"ten_{secrets.token_hex(6)}", f"m-{secrets.token_hex(4)}"
    at = utcnow() - timedelta(minutes=30)
    spec = analytics_spec(sessions)
    batches = [
        [usage_event(tenant, model, occurred_at=at, latency_ms=50, prompt=i, completion=1) for i in range(25)]
        + [tool_event(tenant, "clock", occurred_at=at) for _ in range(5)]
        for _ in range(8)
    ]
    await asyncio.gather(*(deliver(sessions, spec, batch) for batch in batches))
    rows = await rollup_rows(sessions, tenant)
    model_row = rows[(hour_of(at), "model", model, "")]
    assert (model_row["count"], model_row["prompt_tokens"], model_row["completion_tokens"]) == (
        200,
        8 * 300,
        200,
    )
    assert model_row["h06"] == 200
    assert rows[(hour_of(at), "tool", "clock", "")]["count"] == 40
    minutes = await rollup_rows(sessions, tenant, "minute")
    assert minutes[(minute_of(at), "model", "", "")]["count"] == 200


@on_session_loop
async def test_old_minute_rows_are_pruned_and_hours_kept(sessions: Sessions) -> None:
    tenant, model = f"ten_{secrets.token_hex(6)}", f"m-{secrets.token_hex(4)}"
    now = utcnow()
    old, recent = now - timedelta(hours=5), now - timedelta(minutes=2)
    spec = analytics_spec(sessions)
    await deliver(sessions, spec, [usage_event(tenant, model, occurred_at=t) for t in (old, recent)])
    assert await detector(sessions).prune_minutes(now) >= 1
    assert set(await rollup_rows(sessions, tenant, "minute")) == {(minute_of(recent), "model", "", "")}
    assert set(await rollup_rows(sessions, tenant)) == {
        (hour_of(old), "model", model, ""),
        (hour_of(recent), "model", model, ""),
    }
