"""What the app factory hands the builders of the event consumers' domains (billing, analytics,
notifications): the shared infrastructure, built once, that their components are made from."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.config import Settings
from somaagent.events.outbox import BufferedEmitter
from somaagent.observability.metrics import Metrics
from somaagent.policy.budgets import Budgets
from somaagent.policy.prices import PriceBook

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
