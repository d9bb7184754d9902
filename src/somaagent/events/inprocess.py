"""The in-process bus: delivers each published batch to this process's consumer groups at once.

INTERIM (issue 6 in progress): handlers run in one transaction per group; the consumer runner with
`processed_events`, schema checks and dead letters replaces the loop below.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator, Sequence

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.events.consumers import ConsumerSpec
from somaagent.events.schemas import Event


class InProcessBus:
    """Delivers to consumers in this process, in order, awaiting each."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions
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
        """Deliver `events`, grouped by topic, to every consumer group of that topic."""
        by_topic: dict[str, list[Event]] = defaultdict(list)
        for event in events:
            by_topic[event.topic].append(event)
        for topic, batch in by_topic.items():
            for spec in self._specs.get(topic, ()):
                async with self._sessions() as session, session.begin():
                    await spec.handle(session, batch)

    async def tail(self, topic: str, *, from_beginning: bool, limit: int | None) -> AsyncIterator[Event]:
        """Not supported in process (the CLI reads the outbox instead)."""
        raise NotImplementedError("tail the outbox table for the in-process bus")
        yield  # pragma: no cover
