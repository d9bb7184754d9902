"""Writing events: into the caller's transaction, or buffered for high-rate facts like usage."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.events.schemas import AUDIT_EVENTS, Event
from somaagent.events.tables import OutboxEvent

log = logging.getLogger(__name__)


def _row(event: Event) -> dict[str, object]:
    return {
        "id": event.id,
        "topic": event.topic,
        "type": event.type,
        "version": event.version,
        "tenant_id": event.tenant_id,
        "actor": event.actor,
        "occurred_at": event.occurred_at,
        "data": event.data,
        "attempts": 0,
    }


def add_event(session: AsyncSession, event: Event) -> None:
    """Stage `event` in the session's transaction: it commits, or rolls back, with the state change."""
    session.add(OutboxEvent(**_row(event)))


def audit(session: AsyncSession, actor: str, tenant_id: str | None, action: str, **data: object) -> None:
    """Stage an `audit.events` fact in the session's transaction: it commits, or rolls back, with the
    change it records. The one way every domain writes to the audit log."""
    add_event(session, Event(topic=AUDIT_EVENTS, type=action, tenant_id=tenant_id, actor=actor, data=data))


async def insert_events(session: AsyncSession, events: Sequence[Event]) -> None:
    """Insert many events in one statement (the caller commits)."""
    if events:
        await session.execute(insert(OutboxEvent), [_row(e) for e in events])


class BufferedEmitter:
    """Collects events that have no other state to share a transaction with (model usage),
    and writes them to the outbox in batches: one transaction per `flush_ms` instead of one per
    request. An event is durable once flushed; `close()` flushes what is left on shutdown."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        flush_ms: int,
        on_flushed: Callable[[list[Event]], Awaitable[None]] | None = None,
    ) -> None:
        self._sessions = sessions
        self._interval = flush_ms / 1000
        self._buffer: list[Event] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._on_flushed = on_flushed
        # One flush at a time: a caller's flush (read-your-writes before reading usage) must wait
        # for a background flush that has already taken the buffer but not yet committed it.
        self._flushing = asyncio.Lock()
        self._closing = False

    def emit(self, event: Event) -> None:
        """Queue an event; never blocks the request."""
        self._buffer.append(event)
        self._wakeup.set()

    def start(self) -> None:
        """Begin the background flush loop."""
        self._task = asyncio.create_task(self._run(), name="outbox-flush")

    async def flush(self) -> None:
        """Write everything buffered so far; returns once that and any flush under way are committed."""
        async with self._flushing:
            batch: list[Event]
            batch, self._buffer = self._buffer, []
            if not batch:
                return
            try:
                async with self._sessions() as session, session.begin():
                    await insert_events(session, batch)
            except Exception:
                # Keep the events and try again next tick rather than lose usage records.
                log.exception("outbox flush failed; %d events kept for retry", len(batch))
                self._buffer[:0] = batch
                return
        if self._on_flushed is not None:
            await self._on_flushed(batch)

    async def _run(self) -> None:
        while not self._closing:
            await self._wakeup.wait()
            self._wakeup.clear()
            if not self._closing:
                await asyncio.sleep(self._interval)
            try:
                await self.flush()
            except Exception:  # the loop must outlive any one bad flush
                log.exception("outbox flush failed")

    async def close(self) -> None:
        """Stop the loop, letting a flush under way finish (cancelling it could drop its batch), and
        flush the remainder."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        await self.flush()
