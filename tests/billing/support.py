"""What the billing tests share: events shaped like the producers', the consumer wired as the app wires
it (over a real price book), and an operator principal."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.api.composition import PriceBookPricing
from somaagent.billing.consumer import BillingConsumer
from somaagent.core.ids import new_id, new_request_id
from somaagent.core.principal import OPERATOR, Principal
from somaagent.events.schemas import MODEL_USAGE, TOOL_CALLS, Event
from somaagent.policy.prices import PriceBook

Sessions = async_sessionmaker[AsyncSession]
OPERATOR_PRINCIPAL = Principal("ten_platform", "platform", "cli", None, frozenset({OPERATOR}))


def usage_event(
    tenant_id: str,
    model: str,
    prompt: int,
    completion: int,
    *,
    occurred_at: datetime,
    cached: int | None = None,
    key_id: str | None = "key_a",
    user_id: str | None = None,
    status: str = "ok",
) -> Event:
    """A `model.usage` event as `api/metering.py` emits it (`cached_tokens` may be absent)."""
    data: dict[str, Any] = {
        "request_id": new_request_id(),
        "tenant_id": tenant_id,
        "key_id": key_id,
        "user_id": user_id,
        "model": model,
        "kind": "chat",
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "latency_ms": 12,
        "status": status,
    }
    if cached is not None:
        data["cached_tokens"] = cached
    actor = f"user:{user_id}" if user_id else f"key:{key_id}"
    return Event(MODEL_USAGE, "model.usage", tenant_id, actor, data, occurred_at=occurred_at)


def tool_event(tenant_id: str, tool: str, *, occurred_at: datetime, outcome: str = "ok") -> Event:
    """A `tool.calls` event as `tools/registry.py` emits it."""
    data = {
        "session_id": new_id("ses"),
        "run_id": new_id("run"),
        "tool": tool,
        "call_id": new_id("call"),
        "args_sha256": "0" * 64,
        "duration_ms": 3.5,
        "outcome": outcome,
    }
    return Event(TOOL_CALLS, "tool.called", tenant_id, "key:key_t", data, occurred_at=occurred_at)


def billing_consumer(sessions: Sessions) -> BillingConsumer:
    """The consumer as `build_billing` makes it."""
    return BillingConsumer(PriceBookPricing(PriceBook(sessions, 1.0)))


async def deliver(sessions: Sessions, consumer: BillingConsumer, events: Sequence[Event]) -> None:
    """One delivery, in one transaction, as the consumer runner makes it."""
    async with sessions() as session, session.begin():
        await consumer(session, events)
