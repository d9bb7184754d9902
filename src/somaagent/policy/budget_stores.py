"""Where budget spend is counted: holds taken on every budget of a call at once, settled to what was used.

Owns: `Hold`, the `BudgetStore` port, `SqlBudgetStore` (SQLite and PostgreSQL, the embedded default) and
`RedisBudgetStore` (Lua scripts, shared by every replica). May import: core, db, policy.tables,
policy.redis_scripts, redis. Never: decides which budgets apply or what a call costs (`policy/budgets.py`).

Both stores promise the same: a reservation takes all its holds or none (nothing is held anywhere when
one budget has no room); spent + reserved never passes a budget's limit through a reservation; settling
moves each hold from reserved to spent by the actual amount (more than reserved is still counted:
spend is recorded, never lost) and happens once however often it is asked; a reservation never settled
(its process died) is charged by `sweep` at its reserved, worst-case amount once it expires.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, cast

from redis.asyncio import Redis
from sqlalchemy import BigInteger, Table, bindparam, delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.core.clock import utcnow
from somaagent.core.errors import BudgetExceeded
from somaagent.db.statements import insert_skipping_duplicates
from somaagent.policy import redis_scripts
from somaagent.policy.tables import Budget, BudgetCounter, BudgetReservation

_SWEEP_BATCH = 500


@dataclass(frozen=True, slots=True)
class Hold:
    """An amount (tokens or micro-USD) held on one budget's counter for one period. `limit` is the budget's
    limit as the caller knows it: the Redis store checks against it, the SQL store against the row."""

    budget_id: str
    period_start: datetime
    amount: int
    limit: int


class BudgetRefused(BudgetExceeded):
    """A store refused a reservation because `hold`'s budget has no room (its counter at that moment)."""

    def __init__(self, hold: Hold, spent: int, reserved: int) -> None:
        super().__init__(
            f"budget {hold.budget_id} has no room for {hold.amount} more (limit {hold.limit}, spent "
            f"{spent}, reserved {reserved})"
        )
        self.hold = hold
        self.spent = spent
        self.reserved = reserved
        self.extra = {"budget": {"id": hold.budget_id, "spent": spent, "reserved": reserved}}


class BudgetStore(Protocol):
    """Counts budget holds and spend (all holds of one reservation at once)."""

    async def reserve(
        self, reservation_id: str, tenant_id: str, holds: Sequence[Hold], expires_at: datetime
    ) -> None:
        """Take every hold or none; raise `BudgetRefused` (a `BudgetExceeded`) naming the budget without
        room. Reserving an id again holds nothing more."""
        ...

    async def settle(self, reservation_id: str, actual: Mapping[str, int]) -> bool:
        """Charge each hold its actual amount (budget id -> amount; a budget left out is charged what it
        held) and free it. Whether it was settled now (False: settled or swept before)."""
        ...

    async def sweep(self) -> int:
        """Charge expired reservations at their reserved amount and free them; how many."""
        ...

    async def counters(
        self, keys: Sequence[tuple[str, datetime]]
    ) -> dict[tuple[str, datetime], tuple[int, int]]:
        """(spent, reserved) of each (budget id, period start); (0, 0) where nothing was counted yet."""
        ...


class _NoRoom(Exception):
    def __init__(self, hold: Hold) -> None:
        self.hold = hold


def _ordered(holds: Sequence[Hold]) -> list[Hold]:
    # One fixed order of counters for every transaction: two reservations never wait on each other's rows
    # in opposite orders (no deadlock on PostgreSQL), and refusals name budgets deterministically.
    return sorted(holds, key=lambda h: (h.budget_id, h.period_start))


# Statements built once (the request path runs them per call); the `b_` names keep bind parameters apart
# from the columns of the SET clause.
_counters = cast(Table, BudgetCounter.__table__)
_reservations = cast(Table, BudgetReservation.__table__)
_budgets = cast(Table, Budget.__table__)
_TAKE = (
    update(_counters)
    .where(
        _counters.c.budget_id == bindparam("b_budget"),
        _counters.c.period_start == bindparam("b_period"),
        _counters.c.spent + _counters.c.reserved + bindparam("b_amount", type_=BigInteger)
        <= select(_budgets.c.limit_amount).where(_budgets.c.id == bindparam("b_budget")).scalar_subquery(),
    )
    .values(reserved=_counters.c.reserved + bindparam("b_amount", type_=BigInteger))
)
_CHARGE = (
    update(_counters)
    .where(_counters.c.budget_id == bindparam("b_budget"), _counters.c.period_start == bindparam("b_period"))
    .values(
        reserved=_counters.c.reserved - bindparam("b_amount", type_=BigInteger),
        spent=_counters.c.spent + bindparam("b_actual", type_=BigInteger),
    )
)
_FORGET = (
    delete(_reservations).where(_reservations.c.id == bindparam("b_id")).returning(_reservations.c.holds)
)


class SqlBudgetStore:
    """Counters in `budget_counters`, reservations in `budget_reservations`, each reservation and each
    settlement one transaction of conditional UPDATEs."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def reserve(
        self, reservation_id: str, tenant_id: str, holds: Sequence[Hold], expires_at: datetime
    ) -> None:
        """Hold every amount in one transaction, or roll all of it back and raise `BudgetRefused`."""
        ordered = _ordered(holds)
        record = [
            {"budget_id": h.budget_id, "period_start": h.period_start.isoformat(), "amount": h.amount}
            for h in ordered
        ]
        try:
            async with self._sessions() as session, session.begin():
                for hold in ordered:
                    if not await self._take(session, tenant_id, hold):
                        raise _NoRoom(hold)  # rolls back the holds this transaction already took
                await session.execute(
                    insert(_reservations).values(
                        id=reservation_id,
                        tenant_id=tenant_id,
                        holds=record,
                        created_at=utcnow(),
                        expires_at=expires_at,
                    )
                )
        except _NoRoom as no_room:
            refused = no_room.hold
            key = (refused.budget_id, refused.period_start)
            spent, reserved = (await self.counters([key]))[key]
            raise BudgetRefused(refused, spent, reserved) from None
        except IntegrityError:
            # The reservation id exists: a retry of a reservation already held. This transaction rolled
            # back, so nothing is held twice.
            return

    async def _take(self, session: AsyncSession, tenant_id: str, hold: Hold) -> bool:
        """Add `hold` to its counter if it fits the budget's current limit; create the period's counter the
        first time. Whether it was taken."""
        params = {"b_budget": hold.budget_id, "b_period": hold.period_start, "b_amount": hold.amount}
        if (await session.execute(_TAKE, params)).rowcount:  # type: ignore[attr-defined]
            return True
        # No room, or no counter for this period yet. Creating it skips a duplicate, so concurrent first
        # reservations of a period (other replicas too) all end up updating the one row.
        try:
            async with session.begin_nested():
                await session.execute(
                    insert_skipping_duplicates(session, _counters, ["budget_id", "period_start"]).values(
                        budget_id=hold.budget_id,
                        period_start=hold.period_start,
                        tenant_id=tenant_id,
                        spent=0,
                        reserved=0,
                    )
                )
        except IntegrityError:  # the budget was deleted meanwhile (its foreign key): it limits nothing now
            return True
        return bool((await session.execute(_TAKE, params)).rowcount)  # type: ignore[attr-defined]

    async def settle(self, reservation_id: str, actual: Mapping[str, int]) -> bool:
        """Move the holds to spent (by `actual`) and delete the reservation, in one transaction; the delete
        is what makes a second settle (or the sweeper) a no-op."""
        async with self._sessions() as session, session.begin():
            holds = (await session.execute(_FORGET, {"b_id": reservation_id})).scalar()
            if holds is None:
                return False
            for hold in sorted(holds, key=lambda h: (h["budget_id"], h["period_start"])):
                amount = int(hold["amount"])
                await session.execute(
                    _CHARGE,
                    {
                        "b_budget": hold["budget_id"],
                        "b_period": datetime.fromisoformat(hold["period_start"]),
                        "b_amount": amount,
                        "b_actual": int(actual.get(hold["budget_id"], amount)),
                    },
                )
        return True

    async def sweep(self) -> int:
        """Charge every expired reservation in full (each in its own transaction)."""
        charged = 0
        while True:
            async with self._sessions() as session:
                expired = list(
                    await session.scalars(
                        select(BudgetReservation.id)
                        .where(BudgetReservation.expires_at <= utcnow())
                        .order_by(BudgetReservation.expires_at)
                        .limit(_SWEEP_BATCH)
                    )
                )
            for reservation_id in expired:
                charged += await self.settle(reservation_id, {})
            if len(expired) < _SWEEP_BATCH:
                return charged

    async def counters(
        self, keys: Sequence[tuple[str, datetime]]
    ) -> dict[tuple[str, datetime], tuple[int, int]]:
        """(spent, reserved) per (budget id, period start), in one query."""
        found = {key: (0, 0) for key in keys}
        if not keys:
            return found
        async with self._sessions() as session:
            rows = await session.execute(
                select(
                    BudgetCounter.budget_id,
                    BudgetCounter.period_start,
                    BudgetCounter.spent,
                    BudgetCounter.reserved,
                ).where(BudgetCounter.budget_id.in_({budget_id for budget_id, _ in keys}))
            )
            for budget_id, period_start, spent, reserved in rows:
                if (budget_id, period_start) in found:
                    found[(budget_id, period_start)] = (spent, reserved)
        return found


class RedisBudgetStore:
    """Counters and reservations in Redis; reserve, settle and sweep are each one Lua script
    (`policy/redis_scripts.py`), so every replica shares one atomic count."""

    def __init__(self, redis: Redis, *, prefix: str = "soma:") -> None:
        self._redis = redis
        self._prefix = prefix
        self._expiries = f"{prefix}bres-expiries"
        self._reserve = redis_scripts.Script(redis_scripts.BUDGET_RESERVE)
        self._settle = redis_scripts.Script(redis_scripts.BUDGET_SETTLE)
        self._sweep = redis_scripts.Script(redis_scripts.BUDGET_SWEEP)

    def _counter(self, budget_id: str, period_start: datetime) -> str:
        return f"{self._prefix}budget:{budget_id}:{int(period_start.timestamp())}"

    def _reservation(self, reservation_id: str) -> str:
        return f"{self._prefix}bres:{reservation_id}"

    async def reserve(
        self, reservation_id: str, tenant_id: str, holds: Sequence[Hold], expires_at: datetime
    ) -> None:
        """Hold every amount in one script, or raise `BudgetRefused` having held nothing."""
        ordered = _ordered(holds)
        counters = [self._counter(h.budget_id, h.period_start) for h in ordered]
        record = json.dumps(
            [
                {"key": key, "budget_id": h.budget_id, "amount": str(h.amount)}
                for key, h in zip(counters, ordered, strict=True)
            ]
        )
        args: list[str | int] = [reservation_id, int(expires_at.timestamp() * 1000), tenant_id, record]
        for hold in ordered:
            args += [hold.amount, hold.limit]
        reply = await self._reserve.run(
            self._redis, [self._reservation(reservation_id), self._expiries, *counters], args
        )
        if int(reply[0]) == 0:
            hold = ordered[int(reply[1]) - 1]
            raise BudgetRefused(hold, int(reply[2]), int(reply[3]))

    async def settle(self, reservation_id: str, actual: Mapping[str, int]) -> bool:
        """Charge and free the reservation in one script (a no-op if it is gone)."""
        amounts = json.dumps({budget_id: str(amount) for budget_id, amount in actual.items()})
        reply = await self._settle.run(
            self._redis, [self._reservation(reservation_id), self._expiries], [reservation_id, amounts]
        )
        return bool(int(reply))

    async def sweep(self) -> int:
        """Charge expired reservations in full, in batches of one script each."""
        charged = 0
        while True:
            done = int(
                await self._sweep.run(self._redis, [self._expiries], [self._prefix + "bres:", _SWEEP_BATCH])
            )
            charged += done
            if done < _SWEEP_BATCH:
                return charged

    async def counters(
        self, keys: Sequence[tuple[str, datetime]]
    ) -> dict[tuple[str, datetime], tuple[int, int]]:
        """(spent, reserved) per (budget id, period start), in one pipelined round trip."""
        found: dict[tuple[str, datetime], tuple[int, int]] = {}
        if not keys:
            return found
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for budget_id, period_start in keys:
                    pipe.hmget(self._counter(budget_id, period_start), ["spent", "reserved"])
                replies = await pipe.execute()
        except redis_scripts.UNREACHABLE as exc:
            raise redis_scripts.counters_unreachable() from exc
        for key, (spent, reserved) in zip(keys, replies, strict=True):
            found[key] = (int(spent or 0), int(reserved or 0))
        return found
