"""The bus port and its in-process adapter (Kafka and NATS adapters come with the event-bus issue)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from somaagent.events.schemas import Event

# A consumer receives a batch of events of one topic; it must be idempotent by event id,
# because delivery is at-least-once.
Consumer = Callable[[Sequence[Event]], Awaitable[None]]


class EventBus(Protocol):
    """Publish events to topics; deliver them to the consumers of each topic."""

    def subscribe(self, topic: str, consumer: Consumer) -> None: ...

    async def publish(self, events: Sequence[Event]) -> None: ...


class InProcessBus:
    """Delivers to consumers in this process, in order, awaiting each; an exception propagates so
    the relay keeps the events unpublished and retries them."""

    def __init__(self) -> None:
        self._consumers: dict[str, list[Consumer]] = defaultdict(list)

    def subscribe(self, topic: str, consumer: Consumer) -> None:
        """Add a consumer for `topic`."""
        self._consumers[topic].append(consumer)

    async def publish(self, events: Sequence[Event]) -> None:
        """Deliver `events`, grouped by topic, to every consumer of that topic."""
        by_topic: dict[str, list[Event]] = defaultdict(list)
        for event in events:
            by_topic[event.topic].append(event)
        for topic, batch in by_topic.items():
            for consumer in self._consumers.get(topic, ()):
                await consumer(batch)
