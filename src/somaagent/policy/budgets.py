"""Budgets: spend limits in tokens or micro-USD per day, per month or in total, on a tenant, a user or a
key; every model call reserves its worst case on all of them at once and settles what it used.

Owns: `Budgets` (CRUD on `budgets`, scoped by tenant; which budgets apply to a caller, cached; what a
call may cost; reserve, settle, status, the sweeper), `Reservation`, `BudgetInfo`, `BudgetStatus` and
the periods. May import: core, db, events, policy. Never: counts (a `BudgetStore` from
`policy/budget_stores.py` does; `Hold`, `BudgetStore` and the stores are importable from here too).

No role bypasses a budget, operators included. An unpriced model cannot be charged to a usd budget, so
such a call is refused rather than silently free.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.core.clock import utcnow
from somaagent.core.errors import BudgetExceeded, Conflict, InvalidRequest, NotFound
from somaagent.core.ids import new_id
from somaagent.core.periodic import Periodic
from somaagent.core.principal import Principal
from somaagent.events.outbox import audit
from somaagent.policy.budget_stores import (
    BudgetRefused,
    BudgetStore,
    Hold,
    RedisBudgetStore,
    SqlBudgetStore,
)
from somaagent.policy.limits import check_scope, principal_scopes
from somaagent.policy.prices import Price, PriceBook, cost_micros
from somaagent.policy.tables import Budget

__all__ = [
    "BudgetInfo",
    "BudgetStatus",
    "BudgetStore",
    "Budgets",
    "Hold",
    "RedisBudgetStore",
    "Reservation",
    "SqlBudgetStore",
    "period_bounds",
]

log = logging.getLogger(__name__)

UNITS = ("tokens", "usd")
PERIODS = ("day", "month", "total")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # the one period of a `total` budget
_PER = {"day": "per day", "month": "per month", "total": "in total"}
_LEVEL = {"key": 0, "user": 1, "tenant": 2}  # the tightest scope first
MAX_LIMIT = 2**53  # amounts stay exact in Redis's Lua numbers (doubles)


def period_bounds(period: str, now: datetime) -> tuple[datetime, datetime | None]:
    """(start, reset time) of the period containing `now`, in UTC; a `total` budget never resets."""
    now = now.astimezone(UTC)
    if period == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, start + timedelta(days=1)
    if period == "month":
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        return start, (start + timedelta(days=32)).replace(day=1)
    return EPOCH, None


@dataclass(frozen=True, slots=True)
class BudgetInfo:
    """One budget's settings."""

    id: str
    tenant_id: str
    scope: str
    scope_id: str
    unit: str
    limit: int
    period: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """A budget and its counter in the current period."""

    budget: BudgetInfo
    period_start: datetime
    resets_at: datetime | None
    spent: int
    reserved: int

    @property
    def remaining(self) -> int:
        """What a call may still reserve (never below 0, even when a call spent more than it reserved)."""
        return max(0, self.budget.limit - self.spent - self.reserved)


@dataclass(frozen=True, slots=True)
class Reservation:
    """The worst case held for one model call, to settle when it ends."""

    id: str
    tenant_id: str
    model: str
    holds: tuple[Hold, ...]
    units: Mapping[str, str]  # budget id -> tokens | usd
    price: Price | None  # the price the call reserved with; it settles with the same one
    expires_at: datetime


def _info(row: Budget) -> BudgetInfo:
    return BudgetInfo(
        row.id,
        row.tenant_id,
        row.scope,
        row.scope_id,
        row.unit,
        row.limit,
        row.period,
        row.created_at,
        row.updated_at,
    )


def _duration(seconds: float) -> str:
    minutes = math.ceil(seconds / 60)
    days, rest = divmod(minutes, 24 * 60)
    hours, minutes = divmod(rest, 60)
    return " ".join(f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m")) if n) or "1m"


def _amount(unit: str, amount: int) -> str:
    return f"{amount} tokens" if unit == "tokens" else f"${amount / 1_000_000:.6f}"


class Budgets:
    """Budgets of every tenant, and the reservations of model calls against them. One per process."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        store: BudgetStore,
        prices: PriceBook,
        *,
        ttl_s: float,
        reservation_ttl_s: float,
    ) -> None:
        self._sessions = sessions
        self.store = store
        self._prices = prices
        self._ttl_s = ttl_s
        self._reservation_ttl = timedelta(seconds=reservation_ttl_s)
        self._cache: dict[str, tuple[list[BudgetInfo], float]] = {}
        self._sweeper: Periodic | None = None

    def invalidate(self, tenant_id: str) -> None:
        """Forget the cached budgets of a tenant (after a change here)."""
        self._cache.pop(tenant_id, None)

    # Settings.

    async def create(
        self,
        session: AsyncSession,
        principal: Principal,
        scope: str,
        scope_id: str,
        unit: str,
        limit: int,
        period: str,
    ) -> BudgetInfo:
        """A new budget on one scope of the caller's tenant (one per scope, unit and period)."""
        check_scope(scope)
        if unit not in UNITS:
            raise InvalidRequest(
                f"unknown unit {unit!r}; a budget counts one of: {', '.join(UNITS)}", param="unit"
            )
        if period not in PERIODS:
            raise InvalidRequest(f"unknown period {period!r}; one of: {', '.join(PERIODS)}", param="period")
        _check_limit(limit)
        now = utcnow()
        row = Budget(
            id=new_id("bud"),
            tenant_id=principal.tenant_id,
            scope=scope,
            scope_id=scope_id,
            unit=unit,
            limit=limit,
            period=period,
            created_at=now,
            updated_at=now,
        )
        try:
            async with session.begin_nested():
                session.add(row)
        except IntegrityError as exc:
            existing = await session.scalar(
                select(Budget.id).where(
                    Budget.tenant_id == principal.tenant_id,
                    Budget.scope == scope,
                    Budget.scope_id == scope_id,
                    Budget.unit == unit,
                    Budget.period == period,
                )
            )
            raise Conflict(
                f"{scope} {scope_id} already has a {unit} budget {_PER[period]} ({existing}); change its "
                f"limit with PATCH /v1/budgets/{existing}",
                code="budget_exists",
            ) from exc
        info = _info(row)
        self._audit(session, principal, "budget.created", info)
        self.invalidate(principal.tenant_id)
        return info

    async def list_budgets(self, session: AsyncSession, principal: Principal) -> list[BudgetInfo]:
        """The budgets of the caller's tenant: tenant first, then users, then keys."""
        rows = await session.scalars(select(Budget).where(Budget.tenant_id == principal.tenant_id))
        order = {"tenant": 0, "user": 1, "key": 2}
        return sorted(
            (_info(r) for r in rows), key=lambda b: (order.get(b.scope, 9), b.scope_id, b.unit, b.period)
        )

    async def get(self, session: AsyncSession, principal: Principal, budget_id: str) -> BudgetInfo:
        """One budget of the caller's tenant; 404 for anything else (other tenants' budgets included)."""
        row = await session.scalar(
            select(Budget).where(Budget.id == budget_id, Budget.tenant_id == principal.tenant_id)
        )
        if row is None:
            raise NotFound(f"no budget {budget_id!r}; GET /v1/budgets lists them", param="budget_id")
        return _info(row)

    async def update(
        self, session: AsyncSession, principal: Principal, budget_id: str, limit: int
    ) -> BudgetInfo:
        """Change a budget's limit (it applies to the current period's counter at once)."""
        _check_limit(limit)
        row = await session.scalar(
            select(Budget).where(Budget.id == budget_id, Budget.tenant_id == principal.tenant_id)
        )
        if row is None:
            raise NotFound(f"no budget {budget_id!r}; GET /v1/budgets lists them", param="budget_id")
        row.limit = limit
        row.updated_at = utcnow()
        await session.flush()
        info = _info(row)
        self._audit(session, principal, "budget.updated", info)
        self.invalidate(principal.tenant_id)
        return info

    async def delete(self, session: AsyncSession, principal: Principal, budget_id: str) -> BudgetInfo:
        """Remove a budget and its counters (reservations held on it settle as no-ops on it)."""
        info = await self.get(session, principal, budget_id)
        row = await session.get(Budget, budget_id)
        await session.delete(row)
        await session.flush()
        self._audit(session, principal, "budget.deleted", info)
        self.invalidate(principal.tenant_id)
        return info

    # Counters.

    async def statuses(self, budgets: list[BudgetInfo]) -> list[BudgetStatus]:
        """Each budget with its current period's spent and reserved amounts (one store round trip)."""
        now = utcnow()
        bounds = [period_bounds(b.period, now) for b in budgets]
        counted = await self.store.counters(
            [(b.id, start) for b, (start, _) in zip(budgets, bounds, strict=True)]
        )
        return [
            BudgetStatus(b, start, resets_at, *counted[(b.id, start)])
            for b, (start, resets_at) in zip(budgets, bounds, strict=True)
        ]

    async def budget_status(self, principal: Principal, budget: BudgetInfo) -> BudgetStatus:
        """Spent, reserved and remaining of one budget of the caller's tenant in its current period."""
        if budget.tenant_id != principal.tenant_id:
            raise NotFound(f"no budget {budget.id!r}; GET /v1/budgets lists them", param="budget_id")
        return (await self.statuses([budget]))[0]

    async def applicable(self, principal: Principal) -> list[BudgetInfo]:
        """The budgets over the caller: its key's, its user's and its tenant's, tightest scope first."""
        mine = set(principal_scopes(principal))
        return sorted(
            (b for b in await self._tenant_budgets(principal.tenant_id) if (b.scope, b.scope_id) in mine),
            key=lambda b: (_LEVEL.get(b.scope, 9), b.id),
        )

    async def reserve(
        self, principal: Principal, model: str, prompt_tokens: int, max_output_tokens: int
    ) -> Reservation | None:
        """Hold the call's worst case on every budget over the caller, all or none; None when no budget
        applies. Raises `BudgetExceeded` naming the budget without room, `InvalidRequest` if a usd budget
        applies and `model` has no price."""
        budgets = await self.applicable(principal)
        if not budgets:
            return None
        price = None
        if any(b.unit == "usd" for b in budgets):
            price = await self._prices.price(model)
            if price is None:
                usd = next(b for b in budgets if b.unit == "usd")
                raise InvalidRequest(
                    f"model {model!r} has no price, and budget {usd.id} ({usd.scope} {usd.scope_id}) "
                    "counts US dollars, so a call to it cannot be charged; an operator sets its price "
                    f"with PUT /v1/prices/{model}",
                    param="model",
                    code="model_unpriced",
                )
        now = utcnow()
        holds = []
        worst_tokens = prompt_tokens + max_output_tokens
        for budget in budgets:
            if budget.unit == "tokens" or price is None:
                amount = worst_tokens
            else:
                amount = cost_micros(price, prompt_tokens, max_output_tokens)
            holds.append(Hold(budget.id, period_bounds(budget.period, now)[0], amount, budget.limit))
        reservation = Reservation(
            new_id("bres"),
            principal.tenant_id,
            model,
            tuple(holds),
            {b.id: b.unit for b in budgets},
            price,
            now + self._reservation_ttl,
        )
        try:
            await self.store.reserve(reservation.id, principal.tenant_id, holds, reservation.expires_at)
        except BudgetRefused as refused:
            raise self._exceeded(refused, budgets, now) from None
        return reservation

    async def settle(
        self, reservation: Reservation, prompt_tokens: int, completion_tokens: int, model: str | None = None
    ) -> None:
        """Charge what the call used and free the rest; idempotent. Money is priced as `model` (the one
        that answered, when a fallback did) if it has a price, else at the price reserved with."""
        price = reservation.price
        if model is not None and model != reservation.model and price is not None:
            price = await self._prices.price(model) or price
        actual = {}
        for hold in reservation.holds:
            if reservation.units[hold.budget_id] == "tokens":
                actual[hold.budget_id] = prompt_tokens + completion_tokens
            elif price is not None:
                actual[hold.budget_id] = cost_micros(price, prompt_tokens, completion_tokens)
        await self.store.settle(reservation.id, actual)

    async def sweep(self) -> int:
        """Charge reservations whose process died (expired) at their reserved amount; how many."""
        return await self.store.sweep()

    def start_sweeper(self, interval_s: float = 30.0) -> None:
        """Sweep in the background every `interval_s` (every replica may; a reservation is charged once)."""
        if self._sweeper is None:
            self._sweeper = Periodic("budget sweep", self._sweep_and_tell, interval_s, log=log)
            self._sweeper.start()

    async def close(self) -> None:
        """Stop the sweeper."""
        if self._sweeper is not None:
            await self._sweeper.close()
            self._sweeper = None

    async def _sweep_and_tell(self) -> None:
        charged = await self.sweep()
        if charged:
            log.info("charged %d expired budget reservations in full", charged)

    def _exceeded(self, refused: BudgetRefused, budgets: list[BudgetInfo], now: datetime) -> BudgetExceeded:
        budget = next(b for b in budgets if b.id == refused.hold.budget_id)
        _, resets_at = period_bounds(budget.period, now)
        if resets_at is None:
            when = (
                "it is a total budget and does not reset; an admin can raise its limit with "
                f"PATCH /v1/budgets/{budget.id}"
            )
            retry_after = None
        else:
            retry_after = (resets_at - now).total_seconds()
            when = (
                f"it resets at {resets_at.isoformat().replace('+00:00', 'Z')} (in {_duration(retry_after)})"
            )
        unit = budget.unit
        error = BudgetExceeded(
            f"budget {budget.id} ({budget.scope} {budget.scope_id}, {unit} {_PER[budget.period]}) has no "
            f"room for this call: limit {_amount(unit, budget.limit)}, spent {_amount(unit, refused.spent)}, "
            f"reserved by calls in flight {_amount(unit, refused.reserved)}, and this call may need up to "
            f"{_amount(unit, refused.hold.amount)}; {when}",
            retry_after=retry_after,
        )
        error.extra = {
            "budget": {
                "id": budget.id,
                "scope": budget.scope,
                "scope_id": budget.scope_id,
                "unit": budget.unit,
                "limit": budget.limit,
                "spent": refused.spent,
                "reserved": refused.reserved,
                "period": budget.period,
                "resets_at": resets_at.isoformat() if resets_at else None,
            }
        }
        return error

    async def every_budget(self) -> list[BudgetInfo]:
        """Every tenant's budgets (for platform jobs such as the threshold alerts, never for a caller)."""
        async with self._sessions() as session:
            return [_info(r) for r in await session.scalars(select(Budget).order_by(Budget.id))]

    async def _tenant_budgets(self, tenant_id: str) -> list[BudgetInfo]:
        cached = self._cache.get(tenant_id)
        now = time.monotonic()
        if cached is not None and cached[1] > now:
            return cached[0]
        async with self._sessions() as session:
            found = [
                _info(r) for r in await session.scalars(select(Budget).where(Budget.tenant_id == tenant_id))
            ]
        self._cache[tenant_id] = (found, now + self._ttl_s)
        return found

    @staticmethod
    def _audit(session: AsyncSession, principal: Principal, action: str, budget: BudgetInfo) -> None:
        audit(
            session,
            principal.subject,
            principal.tenant_id,
            action,
            budget_id=budget.id,
            scope=budget.scope,
            scope_id=budget.scope_id,
            unit=budget.unit,
            limit=budget.limit,
            period=budget.period,
        )


def _check_limit(limit: int) -> None:
    if not 0 <= limit <= MAX_LIMIT:
        raise InvalidRequest(
            f"limit must be between 0 and {MAX_LIMIT} (tokens, or micro-USD: 1 USD = 1000000); got {limit}",
            param="limit",
        )
