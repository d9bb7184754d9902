"""The in-process bus: delivers each published batch to this process's consumer groups at once,
through the `ConsumerRunner` (schema checks, `processed_events`, retries, dead letters).

Owns: `InProcessBus`. May import: events. Never: a broker client.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator, Sequence

from somaagent.events.bus import BusUnavailable
from somaagent.events.consumers import ConsumerSpec
from somaagent.events.runner import ConsumerRunner, DatabaseUnusable
from somaagent.events.schemas import Event


class InProcessBus:
    """Delivers to the consumer groups of this process, in order, awaiting each: `publish` returns once
    every group has applied (or dead-lettered) every event."""

    def __init__(self, runner: ConsumerRunner) -> None:
        self._runner = runner
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
        A database that cannot record the outcome is `BusUnavailable`: the relay retries the same rows."""
        by_topic: dict[str, list[Event]] = defaultdict(list)
        for event in events:
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
