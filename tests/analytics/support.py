"""What the analytics tests share: events shaped like their producers', the consumer and the detector
wired as `build_analytics` wires them (over a real price book), and reading the rollups back."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.analytics.anomalies import AnomalyDetector, AnomalySettings
from somaagent.analytics.histogram import COLUMNS
from somaagent.analytics.rollups import GROUP, TOPICS, AnalyticsConsumer
from somaagent.analytics.tables import COUNTERS, AnalyticsRollup
from somaagent.api.composition import PriceBookPricing
from somaagent.core.ids import new_id, new_request_id
from somaagent.core.principal import OPERATOR, Principal
from somaagent.events.consumers import ConsumerSpec
from somaagent.events.schemas import CONVERSATION_EVENTS, MODEL_USAGE, POLICY_DECISIONS, TOOL_CALLS, Event
from somaagent.policy.prices import PriceBook

Sessions = async_sessionmaker[AsyncSession]
OPERATOR_PRINCIPAL = Principal("ten_platform", "platform", "cli", None, frozenset({OPERATOR}))


def usage_event(
    tenant_id: str,
    model: str,
    *,
    occurred_at: datetime,
    prompt: int = 10,
    completion: int = 5,
    latency_ms: int = 100,
    status: str = "ok",
    cached: int | None = None,
) -> Event:
    """A `model.usage` event as `api/metering.py` emits it."""
    data: dict[str, Any] = {
        "request_id": new_request_id(),
        "tenant_id": tenant_id,
        "key_id": "key_a",
        "model": model,
        "kind": "chat",
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "latency_ms": latency_ms,
        "status": status,
    }
    if cached is not None:
        data["cached_tokens"] = cached
    return Event(MODEL_USAGE, "model.usage", tenant_id, "key:key_a", data, occurred_at=occurred_at)


def run_event(
    tenant_id: str,
    persona: str | None,
    model: str | None,
    status: str,
    *,
    occurred_at: datetime,
    duration_ms: int = 1500,
    prompt: int = 40,
    completion: int = 8,
) -> Event:
    """A `run.<status>` event as `agents/runs.py` emits it."""
    data = {
        "session_id": new_id("ses"),
        "run_id": new_id("run"),
        "persona": persona,
        "model": model,
        "status": status,
        "reason": None if status == "completed" else "tool_error",
        "steps": 2,
        "tool_calls": 1,
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
        "duration_ms": duration_ms,
    }
    return Event(CONVERSATION_EVENTS, f"run.{status}", tenant_id, "key:key_a", data, occurred_at=occurred_at)


def tool_event(
    tenant_id: str, tool: str, *, occurred_at: datetime, duration_ms: float = 3.5, outcome: str = "ok"
) -> Event:
    """A `tool.called` event as `tools/registry.py` emits it."""
    data = {
        "session_id": new_id("ses"),
        "run_id": new_id("run"),
        "tool": tool,
        "call_id": new_id("call"),
        "args_sha256": "0" * 64,
        "duration_ms": duration_ms,
        "outcome": outcome,
    }
    return Event(TOOL_CALLS, "tool.called", tenant_id, "key:key_a", data, occurred_at=occurred_at)


def policy_event(tenant_id: str, action: str, allowed: bool, *, occurred_at: datetime) -> Event:
    """A `policy.decision` event as `policy/decisions.py` emits it."""
    data = {
        "action": action,
        "subject": "key:key_a",
        "resource": None,
        "scanned": {"chars": 12, "hmac_sha256": "ab" * 32},
        "allowed": allowed,
        "score": 0.0 if allowed else 1.0,
        "severity": "none" if allowed else "high",
        "reasons": [],
    }
    return Event(POLICY_DECISIONS, "policy.decision", tenant_id, "key:key_a", data, occurred_at=occurred_at)


def analytics_spec(sessions: Sessions) -> ConsumerSpec:
    """The consumer group as `build_analytics` makes it."""
    return ConsumerSpec(GROUP, TOPICS, AnalyticsConsumer(PriceBookPricing(PriceBook(sessions, 1.0))))


def detector(sessions: Sessions, outbox: list[int] | None = None, **settings: Any) -> AnomalyDetector:
    """The detector with the default settings (`anomaly_*` in config.py), or those given."""
    pokes = outbox if outbox is not None else []
    return AnomalyDetector(sessions, AnomalySettings(**settings), on_outbox=lambda: pokes.append(1))


async def deliver(sessions: Sessions, spec: ConsumerSpec, events: Sequence[Event]) -> None:
    """One delivery straight to the handler, in one transaction, as the runner makes it."""
    async with sessions() as session, session.begin():
        await spec.handle(session, events)


async def rollup_rows(
    sessions: Sessions, tenant_id: str, period: str = "hour"
) -> dict[tuple[Any, ...], dict[str, int]]:
    """Every rollup row of a tenant: (bucket, kind, name, detail) → counters and histogram."""
    async with sessions() as session:
        rows = (
            await session.execute(
                select(AnalyticsRollup.__table__).where(
                    AnalyticsRollup.tenant_id == tenant_id, AnalyticsRollup.period == period
                )
            )
        ).mappings()
        found: dict[tuple[Any, ...], dict[str, int]] = {}
        for row in rows:
            key = (row["bucket"], row["kind"], row["name"], row["detail"])
            found[key] = {name: int(row[name]) for name in (*COUNTERS, *COLUMNS)}
        return found
