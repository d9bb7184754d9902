"""The platform's price book: what a million prompt and completion tokens of each model cost.

Owns: `Price`, `PriceBook` (versioned prices; `set_price` appends a version, the latest is in force,
cached per model) and `cost_micros`. May import: core, db, events, policy.tables.
Never: charges anyone (budgets and billing do, with the price they read here).

Money is integer micro-USD (1 USD = 1_000_000) end to end: no float ever holds an amount.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.core.clock import utcnow
from somaagent.core.errors import Conflict, InvalidRequest
from somaagent.core.principal import Principal
from somaagent.events.outbox import audit
from somaagent.policy.tables import ModelPrice

MICROS_PER_USD = 1_000_000
_TOKENS_PER_UNIT = 1_000_000  # prices are per million tokens


@dataclass(frozen=True, slots=True)
class Price:
    """One version of a model's price, in micro-USD per million tokens."""

    model: str
    version: int
    prompt_micros_per_mtok: int
    completion_micros_per_mtok: int
    created_at: datetime
    created_by: str


def cost_micros(price: Price, prompt_tokens: int, completion_tokens: int) -> int:
    """What a call costs in micro-USD, rounded UP to a whole micro-USD (never under-charged)."""
    numerator = (
        prompt_tokens * price.prompt_micros_per_mtok + completion_tokens * price.completion_micros_per_mtok
    )
    return -(-numerator // _TOKENS_PER_UNIT)


def _price(row: ModelPrice) -> Price:
    return Price(
        row.model,
        row.version,
        row.prompt_micros_per_mtok,
        row.completion_micros_per_mtok,
        row.created_at,
        row.created_by,
    )


class PriceBook:
    """Prices of every model (platform-wide). A replica trusts its copy of a model's price for `ttl_s`;
    a price set through this object applies in this process at once."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], ttl_s: float) -> None:
        self._sessions = sessions
        self._ttl_s = ttl_s
        self._cache: dict[str, tuple[Price | None, float]] = {}

    def invalidate(self, model: str) -> None:
        """Forget the cached price of `model`."""
        self._cache.pop(model, None)

    async def price(self, model: str) -> Price | None:
        """The price in force for `model`, or None if it has none."""
        cached = self._cache.get(model)
        now = time.monotonic()
        if cached is not None and cached[1] > now:
            return cached[0]
        async with self._sessions() as session:
            found = await _latest(session, model)
        self._cache[model] = (found, now + self._ttl_s)
        return found

    async def list_prices(self, session: AsyncSession) -> list[Price]:
        """The price in force of every priced model, by model id."""
        latest = (
            select(ModelPrice.model, func.max(ModelPrice.version).label("version"))
            .group_by(ModelPrice.model)
            .subquery()
        )
        rows = await session.scalars(
            select(ModelPrice)
            .join(latest, (ModelPrice.model == latest.c.model) & (ModelPrice.version == latest.c.version))
            .order_by(ModelPrice.model)
        )
        return [_price(r) for r in rows]

    async def versions(self, session: AsyncSession, model: str) -> list[Price]:
        """Every version of a model's price, newest first."""
        rows = await session.scalars(
            select(ModelPrice).where(ModelPrice.model == model).order_by(ModelPrice.version.desc())
        )
        return [_price(r) for r in rows]

    async def set_price(
        self,
        session: AsyncSession,
        principal: Principal,
        model: str,
        prompt_micros_per_mtok: int,
        completion_micros_per_mtok: int,
    ) -> Price:
        """Append a new version of `model`'s price (the old versions stay: ledger entries name theirs)."""
        if not model or len(model) > 128:
            raise InvalidRequest("a model id is 1 to 128 characters", param="model")
        for name, value in (
            ("prompt_micros_per_mtok", prompt_micros_per_mtok),
            ("completion_micros_per_mtok", completion_micros_per_mtok),
        ):
            if value < 0:
                raise InvalidRequest(f"{name} must be 0 or more (got {value})", param=name)
        current = await session.scalar(select(func.max(ModelPrice.version)).where(ModelPrice.model == model))
        row = ModelPrice(
            model=model,
            version=(current or 0) + 1,
            prompt_micros_per_mtok=prompt_micros_per_mtok,
            completion_micros_per_mtok=completion_micros_per_mtok,
            created_at=utcnow(),
            created_by=principal.subject,
        )
        try:
            async with session.begin_nested():
                session.add(row)
        except IntegrityError as exc:  # another replica appended the same version first
            raise Conflict(
                f"the price of {model!r} was changed at the same moment; send the request again",
                code="price_conflict",
            ) from exc
        audit(
            session,
            principal.subject,
            None,
            "price.set",
            model=model,
            version=row.version,
            prompt_micros_per_mtok=prompt_micros_per_mtok,
            completion_micros_per_mtok=completion_micros_per_mtok,
        )
        self.invalidate(model)
        return _price(row)


async def _latest(session: AsyncSession, model: str) -> Price | None:
    row = await session.scalar(
        select(ModelPrice).where(ModelPrice.model == model).order_by(ModelPrice.version.desc()).limit(1)
    )
    return _price(row) if row is not None else None
