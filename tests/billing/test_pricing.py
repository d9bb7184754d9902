"""The price book's versions with effective dates, and the ledger pricing each event with the version in
force when it happened: rounding up, cached tokens, per-call and tool prices, unpriced usage kept.
Below HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import secrets
from datetime import timedelta

import pytest
from sqlalchemy import select

from somaagent.billing.tables import LedgerEntry
from somaagent.core.clock import utcnow
from somaagent.core.errors import InvalidRequest
from somaagent.policy.prices import Price, PriceBook, cost_micros
from tests.billing.support import (
    OPERATOR_PRINCIPAL,
    Sessions,
    billing_consumer,
    deliver,
    tool_event,
    usage_event,
)

on_session_loop = pytest.mark.asyncio(loop_scope="session")


def test_costs_round_up_and_charge_cached_tokens_at_their_rate() -> None:
    price = Price(
        "m",
        1,
        prompt_micros_per_mtok=3,
        completion_micros_per_mtok=7,
        created_at=utcnow(),
        created_by="x",
        cached_micros_per_mtok=1,
        call_micros=50,
    )
    assert cost_micros(price, 0, 0, calls=0) == 0
    assert cost_micros(price, 1, 0, calls=0) == 1  # 3 millionths of a micro-USD is one micro-USD
    assert cost_micros(price, 1_000_000, 0, calls=0) == 3
    assert cost_micros(price, 1_000_000, 0, cached_tokens=1_000_000, calls=0) == 1
    # 600k uncached x 3 + 400k cached x 1 + 2M x 7 = 1.8M + 0.4M + 14M = 16.2M / 1M -> 17 (rounded up)
    assert cost_micros(price, 1_000_000, 2_000_000, cached_tokens=400_000, calls=0) == 17
    assert cost_micros(price, 1_000_000, 2_000_000, cached_tokens=400_000) == 17 + 50
    assert cost_micros(price, 10, 0, cached_tokens=99, calls=0) == 1  # cached never exceeds the prompt
    default_cached = Price("m", 1, 5, 0, utcnow(), "x")
    assert default_cached.cached_rate == 5


@on_session_loop
async def test_versions_take_effect_at_their_dates_and_events_are_priced_by_theirs(
    sessions: Sessions,
) -> None:
    book = PriceBook(sessions, 60.0)
    model = f"m-{secrets.token_hex(3)}"
    now = utcnow()
    async with sessions() as session:
        v1 = await book.set_price(session, OPERATOR_PRINCIPAL, model, 1_000_000, 2_000_000)
        v2 = await book.set_price(
            session, OPERATOR_PRINCIPAL, model, 3_000_000, 4_000_000, effective_from=now + timedelta(hours=1)
        )
        v3 = await book.set_price(
            session,
            OPERATOR_PRINCIPAL,
            model,
            5_000_000,
            6_000_000,
            cached_micros_per_mtok=500_000,
            call_micros=7,
            effective_from=now + timedelta(hours=2),
        )
        await session.commit()
    assert (v1.version, v2.version, v3.version) == (1, 2, 3)
    assert v1.cached_rate == 1_000_000  # cached defaults to the prompt price
    assert (await book.price(model)) == v1  # budgets see the version in force now, not the scheduled ones
    assert (await book.price_at(model, now + timedelta(minutes=90))) == v2
    assert (await book.price_at(model, now + timedelta(hours=5))) == v3
    assert await book.price_at(model, now - timedelta(hours=1)) is None
    async with sessions() as session:
        assert [p.version for p in await book.list_prices(session) if p.model == model] == [1]

    tenant = f"ten_{secrets.token_hex(6)}"
    events = [
        usage_event(tenant, model, 1000, 500, occurred_at=now - timedelta(minutes=1)),  # before any price
        usage_event(tenant, model, 1000, 500, occurred_at=now + timedelta(minutes=30)),
        usage_event(tenant, model, 1000, 500, occurred_at=now + timedelta(minutes=90)),
        usage_event(tenant, model, 1000, 500, cached=400, occurred_at=now + timedelta(minutes=150)),
        usage_event(
            tenant, model, 1000, 500, occurred_at=now + timedelta(minutes=151), status="upstream_error"
        ),
    ]
    await deliver(sessions, billing_consumer(sessions), events)
    async with sessions() as session:
        rows = {
            r.source_event_id: r
            for r in await session.scalars(select(LedgerEntry).where(LedgerEntry.tenant_id == tenant))
        }
    got = [(rows[e.id].priced, rows[e.id].price_version, rows[e.id].amount_micros) for e in events]
    assert got == [
        (False, None, 0),  # unpriced usage is kept, at 0
        (True, 1, 1000 * 1 + 500 * 2),
        (True, 2, 1000 * 3 + 500 * 4),
        (True, 3, (600 * 5_000_000 + 400 * 500_000 + 500 * 6_000_000) // 1_000_000 + 7),  # + per call
        (True, 3, 1000 * 5 + 500 * 6),  # a failed call pays its tokens but not the call price
    ]
    assert rows[events[3].id].cached_tokens == 400
    assert all(r.tenant_id == tenant and r.kind == "model" and r.item == model for r in rows.values())


@on_session_loop
async def test_tools_are_priced_per_successful_call(sessions: Sessions) -> None:
    book = PriceBook(sessions, 1.0)
    tool = f"web_fetch_{secrets.token_hex(3)}"
    async with sessions() as session:
        await book.set_price(session, OPERATOR_PRINCIPAL, f"tool:{tool}", 0, 0, call_micros=2_500)
        with pytest.raises(InvalidRequest) as refused:
            await book.set_price(session, OPERATOR_PRINCIPAL, f"tool:{tool}", 10, 0)
        assert refused.value.param == "prompt_micros_per_mtok"
        await session.commit()
    tenant = f"ten_{secrets.token_hex(6)}"
    at = utcnow() + timedelta(seconds=1)
    events = [
        tool_event(tenant, tool, occurred_at=at),
        tool_event(tenant, tool, occurred_at=at, outcome="tool_timeout"),
        tool_event(tenant, "unpriced_tool", occurred_at=at),
    ]
    await deliver(sessions, billing_consumer(sessions), events)
    async with sessions() as session:
        rows = {
            r.source_event_id: r
            for r in await session.scalars(select(LedgerEntry).where(LedgerEntry.tenant_id == tenant))
        }
    assert [
        (rows[e.id].kind, rows[e.id].item, rows[e.id].amount_micros, rows[e.id].priced) for e in events
    ] == [
        ("tool", tool, 2_500, True),
        ("tool", tool, 0, True),
        ("tool", "unpriced_tool", 0, False),
    ]
    assert rows[events[0].id].key_id == "key_t"  # from the actor `key:key_t`


@on_session_loop
async def test_a_version_never_takes_effect_in_the_past_or_before_the_previous_one(
    sessions: Sessions,
) -> None:
    book = PriceBook(sessions, 1.0)
    model = f"m-{secrets.token_hex(3)}"
    now = utcnow()
    async with sessions() as session:
        with pytest.raises(InvalidRequest) as past:
            await book.set_price(
                session, OPERATOR_PRINCIPAL, model, 1, 1, effective_from=now - timedelta(hours=1)
            )
        assert past.value.param == "effective_from" and "in the past" in past.value.message
        await book.set_price(session, OPERATOR_PRINCIPAL, model, 1, 1, effective_from=now + timedelta(days=2))
        with pytest.raises(InvalidRequest) as earlier:
            await book.set_price(
                session, OPERATOR_PRINCIPAL, model, 2, 2, effective_from=now + timedelta(days=1)
            )
        assert earlier.value.param == "effective_from" and "version 1" in earlier.value.message
        with pytest.raises(InvalidRequest) as negative:
            await book.set_price(session, OPERATOR_PRINCIPAL, model, 1, 1, call_micros=-1)
        assert negative.value.param == "call_micros"
        await session.commit()
        assert [p.version for p in await book.versions(session, model)] == [1]
    assert await book.price(model) is None  # scheduled, not yet in force
