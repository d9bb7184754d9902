"""Budgets on real engines: the SQL store on SQLite and PostgreSQL, the Redis store on 127.0.0.1:6379.
Concurrent reservations admit exactly what fits, spend never passes the limit, settling gives back the
rest exactly once, the sweeper charges dead reservations in full, key -> user -> tenant budgets hold all
or nothing, periods start over, and an unpriced model is refused by a usd budget."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.core.clock import utcnow
from somaagent.core.errors import BudgetExceeded, Conflict, InvalidRequest, NotFound
from somaagent.core.ids import new_id
from somaagent.core.principal import Principal
from somaagent.identity.capabilities import OPERATOR_CAPABILITIES
from somaagent.identity.tables import Tenant
from somaagent.policy.budgets import (
    EPOCH,
    BudgetInfo,
    Budgets,
    BudgetStatus,
    BudgetStore,
    Hold,
    RedisBudgetStore,
    Reservation,
    SqlBudgetStore,
    period_bounds,
)
from somaagent.policy.prices import Price, PriceBook, cost_micros

# Tests share the session loop with the `sessions` fixture (and its engine) they use.
on_session_loop = pytest.mark.asyncio(loop_scope="session")

ROOT = Path(__file__).resolve().parents[2]
Sessions = async_sessionmaker[AsyncSession]


@pytest.fixture(params=["sql", "redis"])
def store(request: pytest.FixtureRequest, sessions: Sessions, redis_prefix: tuple[Redis, str]) -> BudgetStore:
    """Each store kind; budgets themselves always live in the database (`sessions`: SQLite, PostgreSQL)."""
    client, prefix = redis_prefix
    return SqlBudgetStore(sessions) if request.param == "sql" else RedisBudgetStore(client, prefix=prefix)


def make_budgets(
    sessions: Sessions, store: BudgetStore, reservation_ttl_s: float = 900.0, prices: PriceBook | None = None
) -> Budgets:
    prices = prices or PriceBook(sessions, 1.0)
    return Budgets(sessions, store, prices, ttl_s=1.0, reservation_ttl_s=reservation_ttl_s)


async def make_caller(
    sessions: Sessions, capabilities: Iterable[str] = ("chat:use", "policy:admin")
) -> Principal:
    """A tenant in the database and a key of one of its users calling."""
    tenant = Tenant(id=new_id("ten"), name=f"t-{secrets.token_hex(4)}", created_at=utcnow(), disabled=False)
    async with sessions() as session:
        session.add(tenant)
        await session.commit()
    key_id = new_id("key")
    return Principal(
        tenant_id=tenant.id,
        tenant_name=tenant.name,
        subject=f"key:{key_id}",
        key_id=key_id,
        capabilities=frozenset(capabilities),
        user_id=new_id("usr"),
    )


async def add_budget(
    budgets: Budgets,
    sessions: Sessions,
    caller: Principal,
    scope: str,
    unit: str,
    limit: int,
    period: str = "day",
) -> BudgetInfo:
    scope_id = {"tenant": caller.tenant_id, "user": caller.user_id, "key": caller.key_id}[scope]
    assert scope_id is not None
    async with sessions() as session:
        budget = await budgets.create(session, caller, scope, scope_id, unit, limit, period)
        await session.commit()
    budgets.invalidate(caller.tenant_id)
    return budget


async def status_of(budgets: Budgets, sessions: Sessions, caller: Principal, budget_id: str) -> BudgetStatus:
    async with sessions() as session:
        budget = await budgets.get(session, caller, budget_id)
    return await budgets.budget_status(caller, budget)


@on_session_loop
async def test_200_concurrent_reservations_admit_exactly_the_50_that_fit(
    sessions: Sessions, store: BudgetStore
):
    budgets = make_budgets(sessions, store)
    caller = await make_caller(sessions)
    budget = await add_budget(budgets, sessions, caller, "key", "tokens", 50 * 30)

    async def one() -> object:
        try:
            return await budgets.reserve(caller, "any-model", prompt_tokens=10, max_output_tokens=20)
        except BudgetExceeded as refused:
            return refused

    outcomes = await asyncio.gather(*(one() for _ in range(200)))
    held = [o for o in outcomes if not isinstance(o, BudgetExceeded)]
    refused = [o for o in outcomes if isinstance(o, BudgetExceeded)]
    assert (len(held), len(refused)) == (50, 150)
    status = await status_of(budgets, sessions, caller, budget.id)
    assert (status.spent, status.reserved, status.remaining) == (0, 1500, 0)

    await asyncio.gather(*(budgets.settle(r, 10, 5) for r in held if isinstance(r, Reservation)))
    status = await status_of(budgets, sessions, caller, budget.id)
    assert (status.spent, status.reserved, status.remaining) == (50 * 15, 0, 1500 - 750)
    assert refused[0].extra["budget"]["id"] == budget.id


@on_session_loop
async def test_settling_gives_back_the_rest_exactly_once(sessions: Sessions, store: BudgetStore) -> None:
    budgets = make_budgets(sessions, store)
    caller = await make_caller(sessions)
    budget = await add_budget(budgets, sessions, caller, "user", "tokens", 1000)
    reservation = await budgets.reserve(caller, "m", 100, 400)
    assert reservation is not None
    assert (await status_of(budgets, sessions, caller, budget.id)).reserved == 500
    for _ in range(3):  # a retried settle, and one racing it
        await asyncio.gather(budgets.settle(reservation, 100, 50), budgets.settle(reservation, 100, 50))
    status = await status_of(budgets, sessions, caller, budget.id)
    assert (status.spent, status.reserved, status.remaining) == (150, 0, 850)
    # A call that used more than it reserved is still counted in full: spend is never lost.
    second = await budgets.reserve(caller, "m", 100, 100)
    assert second is not None
    await budgets.settle(second, 100, 800)
    status = await status_of(budgets, sessions, caller, budget.id)
    assert (status.spent, status.reserved, status.remaining) == (1050, 0, 0)
    with pytest.raises(BudgetExceeded):
        await budgets.reserve(caller, "m", 1, 0)


@on_session_loop
async def test_a_reservation_id_holds_once_however_often_it_is_reserved(
    sessions: Sessions, store: BudgetStore
) -> None:
    budgets = make_budgets(sessions, store)
    caller = await make_caller(sessions)
    budget = await add_budget(budgets, sessions, caller, "key", "tokens", 100)
    key = (budget.id, period_bounds("day", utcnow())[0])
    reservation_id = new_id("bres")
    for _ in range(3):  # a retried reservation
        await store.reserve(
            reservation_id, caller.tenant_id, [Hold(*key, 30, 100)], utcnow() + timedelta(minutes=5)
        )
    assert (await store.counters([key]))[key] == (0, 30)
    assert await store.settle(reservation_id, {budget.id: 10}) is True
    assert await store.settle(reservation_id, {budget.id: 10}) is False
    assert (await store.counters([key]))[key] == (10, 0)


@on_session_loop
async def test_the_sweeper_charges_expired_reservations_in_full_once(sessions: Sessions, store: BudgetStore):
    budgets = make_budgets(sessions, store, reservation_ttl_s=0.2)
    caller = await make_caller(sessions)
    budget = await add_budget(budgets, sessions, caller, "tenant", "tokens", 10_000)
    dead = await budgets.reserve(caller, "m", 300, 700)  # its process "dies": never settled
    alive = await budgets.reserve(caller, "m", 10, 10)
    assert dead is not None and alive is not None
    await budgets.settle(alive, 10, 5)
    assert await budgets.sweep() == 0  # not expired yet
    await asyncio.sleep(0.3)
    assert await budgets.sweep() == 1
    status = await status_of(budgets, sessions, caller, budget.id)
    assert (status.spent, status.reserved) == (15 + 1000, 0)  # the worst case of the dead one
    await budgets.settle(dead, 300, 1)  # its process comes back late: charged once already
    assert await budgets.sweep() == 0
    assert (await status_of(budgets, sessions, caller, budget.id)).spent == 1015


@on_session_loop
async def test_the_tightest_level_refuses_and_nothing_is_held_anywhere(
    sessions: Sessions, store: BudgetStore
):
    budgets = make_budgets(sessions, store)
    operator = await make_caller(sessions, capabilities=OPERATOR_CAPABILITIES)  # no role bypasses budgets
    tenant = await add_budget(budgets, sessions, operator, "tenant", "tokens", 100_000)
    user = await add_budget(budgets, sessions, operator, "user", "tokens", 100_000, "month")
    key = await add_budget(budgets, sessions, operator, "key", "tokens", 100)
    first = await budgets.reserve(operator, "m", 50, 30)
    assert first is not None and {h.budget_id for h in first.holds} == {tenant.id, user.id, key.id}
    with pytest.raises(BudgetExceeded) as refused:
        await budgets.reserve(operator, "m", 50, 30)
    error = refused.value
    assert error.message.startswith(f"budget {key.id} (key {operator.key_id}, tokens per day) has no room")
    assert "limit 100 tokens, spent 0 tokens, reserved by calls in flight 80 tokens" in error.message
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    assert f"it resets at {tomorrow}T00:00:00Z" in error.message
    assert error.retry_after is not None
    resets_at = period_bounds("day", utcnow())[1]
    assert resets_at is not None
    assert abs(error.retry_after - (resets_at - utcnow()).total_seconds()) < 5
    assert error.extra["budget"] == {
        "id": key.id,
        "scope": "key",
        "scope_id": operator.key_id,
        "unit": "tokens",
        "limit": 100,
        "spent": 0,
        "reserved": 80,
        "period": "day",
        "resets_at": resets_at.isoformat(),
    }
    # Only the first reservation is held, on every level; the refused one took nothing from tenant or user.
    for budget in (tenant, user, key):
        assert (await status_of(budgets, sessions, operator, budget.id)).reserved == 80


@on_session_loop
async def test_a_new_period_starts_from_zero_and_a_total_budget_never_resets(
    sessions: Sessions, store: BudgetStore
) -> None:
    budgets = make_budgets(sessions, store)
    caller = await make_caller(sessions)
    daily = await add_budget(budgets, sessions, caller, "key", "tokens", 100)
    # Yesterday's counter is full...
    yesterday = period_bounds("day", utcnow() - timedelta(days=1))[0]
    await store.reserve(new_id("bres"), caller.tenant_id, [Hold(daily.id, yesterday, 100, 100)], utcnow())
    assert (await store.counters([(daily.id, yesterday)]))[(daily.id, yesterday)] == (0, 100)
    # ...and today's starts empty.
    held = await budgets.reserve(caller, "m", 60, 40)
    assert held is not None
    assert held.holds[0].period_start == period_bounds("day", utcnow())[0]

    other = await make_caller(sessions)
    total = await add_budget(budgets, sessions, other, "user", "tokens", 10, "total")
    with pytest.raises(BudgetExceeded) as refused:
        await budgets.reserve(other, "m", 6, 6)
    assert refused.value.retry_after is None
    assert f"budget {total.id}" in refused.value.message
    assert "it is a total budget and does not reset" in refused.value.message
    assert refused.value.extra["budget"]["resets_at"] is None
    assert (await status_of(budgets, sessions, other, total.id)).period_start == EPOCH


def test_periods_are_utc_days_months_and_all_time() -> None:
    late = datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert period_bounds("day", late) == (
        datetime(2026, 12, 31, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    )
    assert period_bounds("month", late) == (
        datetime(2026, 12, 1, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    )
    feb = datetime(2028, 2, 29, 12, tzinfo=UTC)
    assert period_bounds("month", feb) == (datetime(2028, 2, 1, tzinfo=UTC), datetime(2028, 3, 1, tzinfo=UTC))
    assert period_bounds("total", late) == (EPOCH, None)


def test_costs_round_up_to_a_whole_micro_dollar() -> None:
    price = Price(
        "m", 1, prompt_micros_per_mtok=1, completion_micros_per_mtok=3, created_at=utcnow(), created_by="x"
    )
    assert cost_micros(price, 1, 0) == 1  # a millionth of a micro-USD is still charged
    assert cost_micros(price, 0, 0) == 0
    assert cost_micros(price, 1_000_000, 1_000_000) == 4
    assert cost_micros(price, 1_000_001, 0) == 2


@on_session_loop
async def test_an_unpriced_model_is_refused_by_a_usd_budget(sessions: Sessions, store: BudgetStore) -> None:
    prices = PriceBook(sessions, 1.0)
    budgets = make_budgets(sessions, store, prices=prices)
    caller = await make_caller(sessions)
    await add_budget(budgets, sessions, caller, "key", "tokens", 10_000)
    model = f"model-{secrets.token_hex(3)}"
    assert await budgets.reserve(caller, model, 10, 10) is not None  # tokens need no price
    usd = await add_budget(budgets, sessions, caller, "tenant", "usd", 1_000_000)  # $1
    with pytest.raises(InvalidRequest) as refused:
        await budgets.reserve(caller, model, 10, 10)
    assert refused.value.code == "model_unpriced"
    assert refused.value.param == "model"
    assert f"model {model!r} has no price" in refused.value.message
    assert f"PUT /v1/prices/{model}" in refused.value.message
    assert usd.id in refused.value.message

    async with sessions() as session:
        # $2 per million prompt tokens, $10 per million completion tokens.
        await prices.set_price(session, caller, model, 2_000_000, 10_000_000)
        await session.commit()
    held = await budgets.reserve(caller, model, 1000, 500)
    assert held is not None
    usd_hold = next(h for h in held.holds if h.budget_id == usd.id)
    assert usd_hold.amount == 2_000 + 5_000  # micro-USD: 1000 x $2/M + 500 x $10/M
    await budgets.settle(held, 1000, 1)
    status = await status_of(budgets, sessions, caller, usd.id)
    assert (status.spent, status.reserved) == (2_000 + 10, 0)


@on_session_loop
async def test_a_fallback_is_charged_at_the_price_of_the_model_that_answered(
    sessions: Sessions, store: BudgetStore
) -> None:
    prices = PriceBook(sessions, 1.0)
    budgets = make_budgets(sessions, store, prices=prices)
    caller = await make_caller(sessions)
    usd = await add_budget(budgets, sessions, caller, "key", "usd", 1_000_000)
    big, small, free = (f"{name}-{secrets.token_hex(3)}" for name in ("big", "small", "unpriced"))
    async with sessions() as session:
        await prices.set_price(session, caller, big, 10_000_000, 10_000_000)  # $10 per million
        await prices.set_price(session, caller, small, 1_000_000, 1_000_000)  # $1 per million
        await session.commit()
    held = await budgets.reserve(caller, big, 100, 100)  # reserved at the priciest candidate
    assert held is not None and held.holds[0].amount == 2_000
    await budgets.settle(held, 100, 50, model=small)  # the cheaper fallback answered
    assert (await status_of(budgets, sessions, caller, usd.id)).spent == 150
    again = await budgets.reserve(caller, big, 100, 100)
    assert again is not None
    await budgets.settle(again, 100, 50, model=free)  # an unpriced answerer is not free: reserved price
    assert (await status_of(budgets, sessions, caller, usd.id)).spent == 150 + 1_500


@on_session_loop
async def test_budget_settings_are_tenant_scoped(sessions: Sessions, store: BudgetStore) -> None:
    budgets = make_budgets(sessions, store)
    owner, stranger = await make_caller(sessions), await make_caller(sessions)
    budget = await add_budget(budgets, sessions, owner, "key", "tokens", 10)
    with pytest.raises(Conflict, match=f"already has a tokens budget per day \\({budget.id}\\)"):
        await add_budget(budgets, sessions, owner, "key", "tokens", 20)
    async with sessions() as session:
        for attempt in (
            budgets.get(session, stranger, budget.id),
            budgets.update(session, stranger, budget.id, 5),
            budgets.delete(session, stranger, budget.id),
        ):
            with pytest.raises(NotFound):
                await attempt
        assert await budgets.list_budgets(session, stranger) == []
        updated = await budgets.update(session, owner, budget.id, 500)
        await session.commit()
    assert updated.limit == 500
    assert await budgets.reserve(owner, "m", 200, 200) is not None  # the new limit applies at once
    assert await budgets.reserve(stranger, "m", 10**6, 0) is None  # no budget of the owner's applies


WORKER = """
import asyncio, json, sys
from datetime import datetime, timedelta, timezone
from redis.asyncio import Redis
from somaagent.core.errors import BudgetExceeded
from somaagent.core.ids import new_id
from somaagent.policy.budgets import Hold, RedisBudgetStore

prefix, budget_id, period, start_at = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])

async def main() -> None:
    client = Redis(host="127.0.0.1", port=6379)
    store = RedisBudgetStore(client, prefix=prefix)
    hold = Hold(budget_id, datetime.fromisoformat(period), 30, 1500)
    expires = datetime.now(timezone.utc) + timedelta(minutes=5)
    held = 0
    async def one() -> None:
        nonlocal held
        try:
            await store.reserve(new_id("bres"), "ten_x", [hold], expires)
            held += 1
        except BudgetExceeded:
            pass
    await asyncio.sleep(max(0.0, start_at - __import__("time").time()))
    await asyncio.gather(*(one() for _ in range(100)))
    await client.aclose()
    print(json.dumps({"held": held}))

asyncio.run(main())
"""


@on_session_loop
async def test_three_processes_reserve_on_one_redis_budget_exactly(redis_prefix: tuple[Redis, str]) -> None:
    client, prefix = redis_prefix
    budget_id = new_id("bud")
    period = period_bounds("day", utcnow())[0]
    start_at = time.time() + 2.0
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, prefix, budget_id, period.isoformat(), str(start_at)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        for _ in range(3)
    ]
    held = []
    for worker in workers:
        out, err = await asyncio.to_thread(worker.communicate, timeout=60)
        assert worker.returncode == 0, err.decode()
        held.append(json.loads(out)["held"])
    assert sum(held) == 50, held
    store = RedisBudgetStore(client, prefix=prefix)
    assert (await store.counters([(budget_id, period)]))[(budget_id, period)] == (0, 1500)
    assert await client.zcard(f"{prefix}bres-expiries") == 50
