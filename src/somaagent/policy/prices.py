"""The platform's price book: what a million prompt, cached-prompt and completion tokens of each model
cost, and what one call costs (tools are priced per call as `tool:<name>`).

Owns: `Price`, `PriceBook` (versioned prices with effective dates; `set_price` appends a version that
takes effect now or later; each model's versions are cached) and `cost_micros`. May import: core, db,
events, policy.tables. Never: charges anyone (budgets and billing do, with the price they read here).

Money is integer micro-USD (1 USD = 1_000_000) end to end: no float ever holds an amount.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.core.clock import utcnow
from somaagent.core.errors import Conflict, InvalidRequest
from somaagent.core.principal import Principal
from somaagent.events.outbox import audit
from somaagent.policy.tables import ModelPrice

MICROS_PER_USD = 1_000_000
MAX_MICROS = 2**53  # the largest integer a JSON client reads back exactly
TOOL_PREFIX = "tool:"  # a tool's price entry: `tool:<name>`, per call only
_TOKENS_PER_UNIT = 1_000_000  # prices are per million tokens
# An effective time this little in the past is the sender's clock running behind: it means "now".
_CLOCK_SKEW = timedelta(seconds=5)


@dataclass(frozen=True, slots=True)
class Price:
    """One version of a price: micro-USD per million tokens, plus micro-USD per call. A null
    `cached_micros_per_mtok` means cached prompt tokens cost what other prompt tokens cost; a null
    `effective_from` means the version took effect when it was created."""

    model: str
    version: int
    prompt_micros_per_mtok: int
    completion_micros_per_mtok: int
    created_at: datetime
    created_by: str
    cached_micros_per_mtok: int | None = None
    call_micros: int = 0
    effective_from: datetime | None = None

    @property
    def cached_rate(self) -> int:
        """Micro-USD per million cached prompt tokens."""
        if self.cached_micros_per_mtok is None:
            return self.prompt_micros_per_mtok
        return self.cached_micros_per_mtok

    @property
    def in_force_from(self) -> datetime:
        """When this version takes effect."""
        return self.effective_from if self.effective_from is not None else self.created_at


def cost_micros(
    price: Price, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, calls: int = 1
) -> int:
    """What `calls` calls with these tokens cost in micro-USD, the token part rounded UP to a whole
    micro-USD (never under-charged). `cached_tokens` are the part of `prompt_tokens` served from a prompt
    cache (as OpenAI reports them), charged at the cached rate instead of the prompt rate."""
    cached = min(max(cached_tokens, 0), prompt_tokens)
    numerator = (
        (prompt_tokens - cached) * price.prompt_micros_per_mtok
        + cached * price.cached_rate
        + completion_tokens * price.completion_micros_per_mtok
    )
    return -(-numerator // _TOKENS_PER_UNIT) + calls * price.call_micros


def in_force(versions: Sequence[Price], when: datetime) -> Price | None:
    """Of one model's versions (any order), the one in force at `when`: the newest that took effect by
    then (a later version never takes effect before an earlier one)."""
    found: Price | None = None
    for price in versions:
        if price.in_force_from <= when and (found is None or price.version > found.version):
            found = price
    return found


def _price(row: ModelPrice) -> Price:
    return Price(
        row.model,
        row.version,
        row.prompt_micros_per_mtok,
        row.completion_micros_per_mtok,
        row.created_at,
        row.created_by,
        cached_micros_per_mtok=row.cached_micros_per_mtok,
        call_micros=row.call_micros,
        effective_from=row.effective_from,
    )


class PriceBook:
    """Prices of every model and tool (platform-wide). A replica trusts its copy of a model's versions
    for `ttl_s`; a price set through this object applies in this process at once."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], ttl_s: float) -> None:
        self._sessions = sessions
        self._ttl_s = ttl_s
        self._cache: dict[str, tuple[list[Price], float]] = {}

    def invalidate(self, model: str) -> None:
        """Forget the cached versions of `model`."""
        self._cache.pop(model, None)

    async def price(self, model: str) -> Price | None:
        """The price in force now for `model`, or None if it has none."""
        return await self.price_at(model, utcnow())

    async def price_at(self, model: str, when: datetime) -> Price | None:
        """The version of `model`'s price in force at `when`, or None if none was."""
        return in_force(await self._cached_versions(model), when)

    async def _cached_versions(self, model: str) -> list[Price]:
        cached = self._cache.get(model)
        now = time.monotonic()
        if cached is not None and cached[1] > now:
            return cached[0]
        async with self._sessions() as session:
            found = (await self.versions_of(session, [model])).get(model, [])
        self._cache[model] = (found, now + self._ttl_s)
        return found

    async def versions_of(self, session: AsyncSession, models: Collection[str]) -> dict[str, list[Price]]:
        """Every version of each of `models` that has a price, oldest first, read through `session`
        (uncached: what the database holds in that transaction)."""
        if not models:
            return {}
        rows = await session.scalars(
            select(ModelPrice)
            .where(ModelPrice.model.in_(sorted(set(models))))
            .order_by(ModelPrice.model, ModelPrice.version)
        )
        found: dict[str, list[Price]] = {}
        for row in rows:
            found.setdefault(row.model, []).append(_price(row))
        return found

    async def list_prices(self, session: AsyncSession) -> list[Price]:
        """The price in force now of every priced model and tool, by id."""
        now = utcnow()
        versions: dict[str, list[Price]] = {}
        for row in await session.scalars(select(ModelPrice).order_by(ModelPrice.model, ModelPrice.version)):
            versions.setdefault(row.model, []).append(_price(row))
        current = (in_force(found, now) for found in versions.values())
        return [p for p in current if p is not None]

    async def versions(self, session: AsyncSession, model: str) -> list[Price]:
        """Every version of a model's price, newest first (scheduled ones included)."""
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
        *,
        cached_micros_per_mtok: int | None = None,
        call_micros: int = 0,
        effective_from: datetime | None = None,
    ) -> Price:
        """Append a new version of `model`'s price, in force from `effective_from` (default: now; never
        in the past, never before the previous version's). Old versions stay: ledger entries name theirs."""
        if not model or len(model) > 128:
            raise InvalidRequest("a model id is 1 to 128 characters", param="model")
        cached = prompt_micros_per_mtok if cached_micros_per_mtok is None else cached_micros_per_mtok
        for name, value in (
            ("prompt_micros_per_mtok", prompt_micros_per_mtok),
            ("completion_micros_per_mtok", completion_micros_per_mtok),
            ("cached_micros_per_mtok", cached),
            ("call_micros", call_micros),
        ):
            if not 0 <= value <= MAX_MICROS:
                raise InvalidRequest(f"{name} must be between 0 and {MAX_MICROS} (got {value})", param=name)
        if model.startswith(TOOL_PREFIX):
            if len(model) == len(TOOL_PREFIX):
                raise InvalidRequest("a tool's price is named `tool:<tool name>`", param="model")
            for name, value in (
                ("prompt_micros_per_mtok", prompt_micros_per_mtok),
                ("completion_micros_per_mtok", completion_micros_per_mtok),
                ("cached_micros_per_mtok", cached),
            ):
                if value:
                    raise InvalidRequest(
                        f"{model!r} is a tool's price: set only call_micros, not {name}", param=name
                    )
        now = utcnow()
        starts = self._effective_from(effective_from, now)
        previous = await session.scalar(
            select(ModelPrice).where(ModelPrice.model == model).order_by(ModelPrice.version.desc()).limit(1)
        )
        if previous is not None and starts < previous.effective_from:
            raise InvalidRequest(
                f"effective_from {starts.isoformat()} is before {previous.effective_from.isoformat()}, when "
                f"version {previous.version} of {model!r} takes effect; a new version takes effect at or "
                "after the one before it",
                param="effective_from",
            )
        row = ModelPrice(
            model=model,
            version=(previous.version if previous is not None else 0) + 1,
            prompt_micros_per_mtok=prompt_micros_per_mtok,
            completion_micros_per_mtok=completion_micros_per_mtok,
            cached_micros_per_mtok=cached,
            call_micros=call_micros,
            effective_from=starts,
            created_at=now,
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
            cached_micros_per_mtok=cached,
            call_micros=call_micros,
            effective_from=starts.isoformat(),
        )
        self.invalidate(model)
        return _price(row)

    @staticmethod
    def _effective_from(requested: datetime | None, now: datetime) -> datetime:
        """When a new version takes effect: now, or the future time asked for."""
        if requested is None:
            return now
        if requested.tzinfo is None:
            raise InvalidRequest(
                "effective_from needs a time zone: add `Z` (UTC) or an offset such as +02:00",
                param="effective_from",
            )
        if requested < now - _CLOCK_SKEW:
            raise InvalidRequest(
                f"effective_from {requested.isoformat()} is in the past; a price applies from now on "
                "(charges already made keep the version they were priced with; adjust them with "
                "POST /v1/billing/corrections)",
                param="effective_from",
            )
        return max(requested, now).astimezone(now.tzinfo)
