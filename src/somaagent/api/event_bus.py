"""Choosing the event bus adapter from settings (composition, beside the app factory).

Owns: `build_bus`. May import: config, events (the broker adapters lazily, so a deployment on the
in-process bus never loads a broker client). Never: a domain package.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.config import Settings
from somaagent.events.bus import EventBus
from somaagent.events.inprocess import InProcessBus
from somaagent.events.runner import ConsumerRunner


def build_runner(
    settings: Settings, sessions: async_sessionmaker[AsyncSession], on_outbox: Callable[[], None]
) -> ConsumerRunner:
    """The consumer runner every adapter delivers through (`on_outbox`: poke the relay)."""
    return ConsumerRunner(sessions, attempts=settings.event_consumer_attempts, on_outbox=on_outbox)


def build_bus(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    on_outbox: Callable[[], None] | None = None,
) -> EventBus:
    """The bus `SOMA_EVENT_BUS` names; `on_outbox` is called when a consumer staged outbox rows (dead
    letters, notifications) so the relay looks soon (without it, the relay's polling finds them)."""
    runner = build_runner(settings, sessions, on_outbox or _nothing)
    if settings.event_bus == "kafka":
        kafka_bus = _adapter("somaagent.events.kafka", "KafkaBus")
        return kafka_bus(settings.kafka_bootstrap, runner, client_id=settings.event_stream_prefix)
    if settings.event_bus == "nats":
        nats_bus = _adapter("somaagent.events.nats", "NatsBus")
        return nats_bus(settings.nats_url, runner, prefix=settings.event_stream_prefix)
    return InProcessBus(runner)


def _adapter(module: str, name: str) -> Callable[..., EventBus]:
    """A broker adapter class, imported only when chosen (its client library loads with it)."""
    factory: Callable[..., EventBus] = getattr(importlib.import_module(module), name)
    return factory


def _nothing() -> None:
    """No relay to poke."""
