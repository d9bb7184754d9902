"""What the app factory hands the builders of the event consumers' domains (billing, analytics,
notifications): the shared infrastructure, built once, that their components are made from."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.config import Settings
from somaagent.core.pricing import Charge, PriceRequest
from somaagent.events.outbox import BufferedEmitter
from somaagent.observability.metrics import Metrics
from somaagent.policy.budgets import Budgets
from somaagent.policy.prices import PriceBook, cost_micros, in_force

Check = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Platform:
    """Shared infrastructure. `poke_relay` asks the outbox relay for a pass after a commit that wrote
    events outside a request (the relay also polls)."""

    settings: Settings
    sessions: async_sessionmaker[AsyncSession]
    secret: bytes
    emitter: BufferedEmitter
    poke_relay: Callable[[], None]
    metrics: Metrics
    prices: PriceBook
    budgets: Budgets


class PriceBookPricing:
    """The `Pricing` port of billing and analytics over the platform's price book: every version of the
    batch's models and tools, read in the consumer's transaction (never a replica's cache: a price set a
    moment ago on another replica applies to the events after its effective time)."""

    def __init__(self, prices: PriceBook) -> None:
        self._prices = prices

    async def charges(self, session: AsyncSession, items: Sequence[PriceRequest]) -> list[Charge | None]:
        """The charge of each item at the version in force when it happened; None when none was."""
        versions = await self._prices.versions_of(session, {i.price_name for i in items})
        found: list[Charge | None] = []
        for item in items:
            price = in_force(versions.get(item.price_name, ()), item.occurred_at)
            found.append(
                None
                if price is None
                else Charge(
                    price.version,
                    cost_micros(
                        price, item.prompt_tokens, item.completion_tokens, item.cached_tokens, item.calls
                    ),
                )
            )
        return found
