"""The bus port: publish outbox events to topics, and run consumer groups over them.

Adapters: `InProcessBus` (here), `KafkaBus` (events/kafka.py), `NatsBus` (events/nats.py), chosen by
the app factory from `SOMA_EVENT_BUS`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from somaagent.events.consumers import ConsumerSpec
from somaagent.events.schemas import Event


class BusUnavailable(Exception):
    """The broker cannot take events now (down, unreachable, timed out): retry the same events later,
    in the same order; nothing about the events themselves is wrong."""


class EventTooLarge(ValueError):
    """An event whose envelope exceeds the bus's size limit: a bad event, never deliverable."""


class EventBus(Protocol):
    """Publish events to their topics; deliver them to every subscribed consumer group."""

    def subscribe(self, spec: ConsumerSpec) -> None:
        """Add a consumer group (before `start`)."""
        ...

    async def start(self) -> None:
        """Connect, create the topics or streams, and start the consumer loops."""
        ...

    async def publish(self, events: Sequence[Event]) -> None:
        """Publish `events` in order; returns once the broker holds all of them.
        Raises `BusUnavailable` when it cannot; any other exception names a bad event."""
        ...

    def tail(self, topic: str, *, from_beginning: bool, limit: int | None) -> AsyncIterator[Event]:
        """Events of `topic` as they arrive (after the existing ones with `from_beginning`), read
        without a consumer group: tailing never moves any group's position."""
        ...

    async def close(self) -> None:
        """Stop the consumer loops (letting a batch under way finish) and disconnect."""
        ...
