"""The `analytics` consumer: every model call, finished run, tool call and policy decision is added to
its tenant's hourly rollup (per model, persona and model, tool, or action) and to the per-minute totals
the live counters read, with atomic upserts (`c = c + excluded.c`) so replicas never lose an update.

Owns: `AnalyticsConsumer`, `GROUP`, `TOPICS`, `hour_of`, `minute_of`. May import: core, db, events,
analytics. Never: commits (the runner does, with the `processed_events` marks that make each event
count once), or reads another domain's tables (spend is priced through the `Pricing` port).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.analytics.anomaly_state import ensure_baselines
from somaagent.analytics.histogram import BUCKETS, COLUMNS, bucket_of
from somaagent.analytics.pricing import Pricing
from somaagent.analytics.tables import COUNTERS, AnalyticsRollup
from somaagent.core.pricing import PriceRequest
from somaagent.db.statements import upsert_adding
from somaagent.events.schemas import CONVERSATION_EVENTS, MODEL_USAGE, POLICY_DECISIONS, TOOL_CALLS, Event

GROUP = "analytics"
TOPICS = (MODEL_USAGE, CONVERSATION_EVENTS, TOOL_CALLS, POLICY_DECISIONS)
KINDS = ("model", "run", "tool", "policy")
RUN_ENDINGS = ("completed", "failed", "cancelled")  # other run statuses are not the end of a run
TOOL_PRICE_PREFIX = "tool:"  # a tool's entry in the price book
_NAME_CHARS = 160
_KEY = ("tenant_id", "period", "bucket", "kind", "name", "detail")
_SUMS = (*COUNTERS, *COLUMNS)
_ROWS_PER_STATEMENT = 500


def hour_of(when: datetime) -> datetime:
    """The UTC start of the hour `when` falls in."""
    return when.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def minute_of(when: datetime) -> datetime:
    """The UTC start of the minute `when` falls in."""
    return when.astimezone(UTC).replace(second=0, microsecond=0)


@dataclass(slots=True)
class _Fact:
    """One event reduced to what the rollups count."""

    tenant_id: str
    occurred_at: datetime
    kind: str
    name: str
    detail: str = ""
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    duration_ms: float | None = None
    cost: PriceRequest | None = None


def _count(data: dict[str, Any], name: str) -> int:
    value = data.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return 0
    return int(value)


def _duration(data: dict[str, Any], name: str) -> float | None:
    value = data.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return None
    return float(value)


def _name(value: object) -> str:
    return str(value)[:_NAME_CHARS] if value is not None else ""


def _fact(event: Event) -> _Fact | None:
    """What `event` adds to the rollups; None for events analytics does not count."""
    if not event.tenant_id:
        return None
    data = event.data
    tenant, when = event.tenant_id, event.occurred_at
    if event.topic == MODEL_USAGE and event.type == "model.usage":
        model = _name(data.get("model"))
        prompt = _count(data, "prompt_tokens")
        cached = min(_count(data, "cached_tokens"), prompt)
        completion = _count(data, "completion_tokens")
        ok = data.get("status", "ok") == "ok"
        return _Fact(
            tenant,
            when,
            "model",
            model,
            errors=int(not ok),
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=cached,
            duration_ms=_duration(data, "latency_ms"),
            # Priced as billing charges it: tokens always, the per-call price only for a call that worked.
            cost=PriceRequest(model, when, prompt, completion, cached, int(ok)),
        )
    if event.topic == CONVERSATION_EVENTS and event.type.startswith("run."):
        status = data.get("status")
        if status not in RUN_ENDINGS:
            return None
        found = data.get("usage")
        usage: dict[str, Any] = found if isinstance(found, dict) else {}
        return _Fact(
            tenant,
            when,
            "run",
            _name(data.get("persona")),
            _name(data.get("model")),
            errors=int(status == "failed"),
            prompt_tokens=_count(usage, "prompt_tokens"),
            completion_tokens=_count(usage, "completion_tokens"),
            duration_ms=_duration(data, "duration_ms"),
        )
    if event.topic == TOOL_CALLS and event.type == "tool.called":
        tool = _name(data.get("tool"))
        ok = data.get("outcome", "ok") == "ok"
        return _Fact(
            tenant,
            when,
            "tool",
            tool,
            errors=int(not ok),
            duration_ms=_duration(data, "duration_ms"),
            cost=PriceRequest(TOOL_PRICE_PREFIX + tool, when, 0, 0, 0, int(ok)),
        )
    if event.topic == POLICY_DECISIONS and event.type == "policy.decision":
        denied = int(data.get("allowed") is False)
        return _Fact(tenant, when, "policy", _name(data.get("action")), errors=denied)
    return None


def _sums(fact: _Fact, cost: int | None) -> list[int]:
    """The counters one fact adds, in `_SUMS` order."""
    histogram = [0] * BUCKETS
    duration_us = 0
    if fact.duration_ms is not None:
        histogram[bucket_of(fact.duration_ms)] = 1
        duration_us = round(fact.duration_ms * 1000)
    priced = fact.cost is None or cost is not None
    return [
        1,
        fact.errors,
        fact.prompt_tokens,
        fact.completion_tokens,
        fact.cached_tokens,
        cost or 0,
        int(not priced),
        duration_us,
        *histogram,
    ]


class AnalyticsConsumer:
    """The handler of consumer group `analytics`. Prices spend through `pricing` (the price version in
    force when each call happened, read in the runner's transaction)."""

    def __init__(self, pricing: Pricing) -> None:
        self._pricing = pricing

    async def __call__(self, session: AsyncSession, events: Sequence[Event]) -> None:
        """Add `events` to the rollups (each event once, even if the batch repeats it)."""
        seen: set[str] = set()
        facts: list[_Fact] = []
        for event in events:
            if event.id in seen:
                continue
            seen.add(event.id)
            fact = _fact(event)
            if fact is not None:
                facts.append(fact)
        if not facts:
            return
        priced = [f for f in facts if f.cost is not None]
        charges = await self._pricing.charges(session, [f.cost for f in priced if f.cost is not None])
        cost_of = {
            id(f): None if c is None else c.amount_micros for f, c in zip(priced, charges, strict=True)
        }
        totals: dict[tuple[Any, ...], list[int]] = {}
        first_hour: dict[str, datetime] = {}
        for fact in facts:
            sums = _sums(fact, cost_of.get(id(fact)))
            hour = hour_of(fact.occurred_at)
            keys = (
                (fact.tenant_id, "hour", hour, fact.kind, fact.name, fact.detail),
                (fact.tenant_id, "minute", minute_of(fact.occurred_at), fact.kind, "", ""),
            )
            for key in keys:
                found = totals.get(key)
                if found is None:
                    totals[key] = list(sums)
                else:
                    for i, value in enumerate(sums):
                        found[i] += value
            if fact.kind in ("model", "tool"):
                first_hour[fact.tenant_id] = min(hour, first_hour.get(fact.tenant_id, hour))
        await _upsert(session, totals)
        # The anomaly baselines of a tenant start the hour before its first priced traffic.
        await ensure_baselines(session, {t: h - timedelta(hours=1) for t, h in first_hour.items()})


async def _upsert(session: AsyncSession, totals: dict[tuple[Any, ...], list[int]]) -> None:
    """Add `totals` to their rows atomically, in one key order for every writer (no deadlocks)."""
    rows = [
        dict(zip(_KEY, key, strict=True)) | dict(zip(_SUMS, sums, strict=True))
        for key, sums in sorted(totals.items(), key=lambda kv: tuple(str(k) for k in kv[0]))
    ]
    # The Core table, not the ORM entity: no bulk-persistence bookkeeping.
    statement = upsert_adding(session, AnalyticsRollup.__table__, _KEY, _SUMS)
    for start in range(0, len(rows), _ROWS_PER_STATEMENT):
        await session.execute(statement, rows[start : start + _ROWS_PER_STATEMENT])
