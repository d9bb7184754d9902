"""The in-process bus: delivers each published batch to this process's consumer groups at once,
through the `ConsumerRunner` (schema checks, `processed_events`, retries, dead letters).

Owns: `InProcessBus`. May import: events. Never: a broker client.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator, Sequence

from somaagent.events.bus import BusUnavailable, EventTooLarge
from somaagent.events.consumers import ConsumerSpec
from somaagent.events.runner import ConsumerRunner, DatabaseUnusable
from somaagent.events.schemas import Event
from somaagent.events.wire import encode_event

# What a broker refuses by default (NATS max_payload, Kafka message.max.bytes are about 1 MB): the
# in-process bus refuses it too, so an oversized event is found in development, not in production.
MAX_EVENT_BYTES = 1024 * 1024


class InProcessBus:
    """Delivers to the consumer groups of this process, in order, awaiting each: `publish` returns once
    every group has applied (or dead-lettered) every event."""

    def __init__(self, runner: ConsumerRunner, *, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._runner = runner
        self._max_event_bytes = max_event_bytes
        self._specs: dict[str, list[ConsumerSpec]] = defaultdict(list)

    def subscribe(self, spec: ConsumerSpec) -> None:
        """Add a consumer group."""
        for topic in spec.topics:
            self._specs[topic].append(spec)

    async def start(self) -> None:
        """Nothing to connect."""

    async def close(self) -> None:
        """Nothing to disconnect."""

    async def publish(self, events: Sequence[Event]) -> None:
        """Deliver `events`, grouped by topic (order kept within a topic), to every group of that topic.
        A database that cannot record the outcome is `BusUnavailable`: the relay retries the same rows;
        an oversized event is `EventTooLarge` (nothing of the batch is delivered)."""
        by_topic: dict[str, list[Event]] = defaultdict(list)
        for event in events:
            size = len(encode_event(event))
            if size > self._max_event_bytes:
                raise EventTooLarge(
                    f"event {event.id} ({event.type}) is {size} bytes; the bus takes {self._max_event_bytes}"
                )
            by_topic[event.topic].append(event)
        for topic, batch in by_topic.items():
            for spec in self._specs.get(topic, ()):
                try:
                    await self._runner.handle_events(spec, topic, batch)
                except DatabaseUnusable as exc:
                    raise BusUnavailable(str(exc)) from exc

    async def tail(self, topic: str, *, from_beginning: bool, limit: int | None) -> AsyncIterator[Event]:
        """Not kept in process: `soma events tail` reads the outbox table for the in-process bus."""
        raise NotImplementedError("tail the outbox table for the in-process bus")
        yield  # pragma: no cover
