"""The `billing` consumer of `model.usage` and `tool.calls`: one ledger entry per billable event, priced
with the version in force when the event happened, idempotent by the event's id.

Owns: `BillingConsumer`, `BillableEventInvalid`. May import: core, events, billing.
Never: drops usage (an unpriced model or tool still gets an entry, of 0 with `priced=false`), commits.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.billing.entries import NewEntry, append_entries
from somaagent.billing.pricing import Pricing
from somaagent.core.clock import utcnow
from somaagent.core.ids import new_id
from somaagent.core.pricing import Charge, PriceRequest
from somaagent.events.schemas import MODEL_USAGE, TOOL_CALLS, Event

GROUP = "billing"
TOPICS = (MODEL_USAGE, TOOL_CALLS)
TOOL_PRICE_PREFIX = "tool:"  # a tool's price entry in the price book
_BILLABLE = frozenset({(MODEL_USAGE, "model.usage"), (TOOL_CALLS, "tool.called")})


class BillableEventInvalid(ValueError):
    """A usage event whose numbers cannot be billed (the runner dead-letters it with this message)."""


def _count(data: dict[str, Any], name: str, event: Event) -> int:
    value = data.get(name, 0)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BillableEventInvalid(f"event {event.id}: {name} must be a whole number >= 0, not {value!r}")
    return value


def _text(data: dict[str, Any], name: str, limit: int) -> str | None:
    value = data.get(name)
    return str(value)[:limit] if value is not None else None


def _subject_id(actor: str | None, prefix: str) -> str | None:
    """The id in a subject like `key:<id>` or `user:<id>`, when the actor is one."""
    if actor is not None and actor.startswith(prefix):
        return actor[len(prefix) :][:40]
    return None


class BillingConsumer:
    """The handler of consumer group `billing`. Prices through `pricing` (the price book's versions, read
    in the runner's transaction) and appends through `append_entries`, which also keeps the rollups."""

    def __init__(self, pricing: Pricing) -> None:
        self._pricing = pricing

    async def __call__(self, session: AsyncSession, events: Sequence[Event]) -> None:
        """Append one ledger entry per billable event in `events` (others are ignored)."""
        billable = [(e, self._request(e)) for e in events if e.tenant_id and self._is_billable(e)]
        if not billable:
            return
        charges = await self._pricing.charges(session, [request for _, request in billable])
        now = utcnow()
        entries = [
            self._entry(event, request, charge, now)
            for (event, request), charge in zip(billable, charges, strict=True)
        ]
        await append_entries(session, entries)

    @staticmethod
    def _is_billable(event: Event) -> bool:
        return (event.topic, event.type) in _BILLABLE

    @staticmethod
    def _request(event: Event) -> PriceRequest:
        data = event.data
        if event.topic == MODEL_USAGE:
            model = data.get("model")
            if not isinstance(model, str) or not model:
                raise BillableEventInvalid(f"event {event.id}: `model` is missing")
            prompt = _count(data, "prompt_tokens", event)
            # Cached tokens are part of the prompt (as OpenAI reports them); never more than all of it.
            cached = min(_count(data, "cached_tokens", event), prompt)
            ok = data.get("status", "ok") == "ok"
            return PriceRequest(
                model[:160],
                event.occurred_at,
                prompt,
                _count(data, "completion_tokens", event),
                cached,
                int(ok),
            )
        tool = data.get("tool")
        if not isinstance(tool, str) or not tool:
            raise BillableEventInvalid(f"event {event.id}: `tool` is missing")
        ok = data.get("outcome", "ok") == "ok"
        return PriceRequest(TOOL_PRICE_PREFIX + tool[:150], event.occurred_at, 0, 0, 0, int(ok))

    @staticmethod
    def _entry(event: Event, request: PriceRequest, charge: Charge | None, now: datetime) -> NewEntry:
        data = event.data
        is_model = event.topic == MODEL_USAGE
        return NewEntry(
            id=new_id("led"),
            tenant_id=str(event.tenant_id),
            source_event_id=event.id,
            request_id=_text(data, "request_id" if is_model else "call_id", 64),
            occurred_at=event.occurred_at,
            kind="model" if is_model else "tool",
            item=request.price_name if is_model else request.price_name[len(TOOL_PRICE_PREFIX) :],
            status=str(data.get("status" if is_model else "outcome", "ok"))[:64],
            key_id=_text(data, "key_id", 40) if is_model else _subject_id(event.actor, "key:"),
            subject=event.actor[:255] if event.actor else None,
            user_id=_text(data, "user_id", 40) if is_model else _subject_id(event.actor, "user:"),
            prompt_tokens=request.prompt_tokens,
            completion_tokens=request.completion_tokens,
            cached_tokens=request.cached_tokens,
            quantity=1,
            amount_micros=charge.amount_micros if charge is not None else 0,
            priced=charge is not None,
            price_version=charge.price_version if charge is not None else None,
            corrects=None,
            reason=None,
            recorded_by=None,
            recorded_at=now,
        )
