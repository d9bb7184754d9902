"""The outbox relay: publishes committed outbox rows to the bus, in order, at least once."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.core.clock import utcnow
from somaagent.events.bus import EventBus
from somaagent.events.schemas import Event
from somaagent.events.tables import OutboxEvent

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5
BATCH = 500


def _event(row: OutboxEvent) -> Event:
    return Event(
        topic=row.topic,
        type=row.type,
        tenant_id=row.tenant_id,
        actor=row.actor,
        data=row.data,
        id=row.id,
        occurred_at=row.occurred_at,
        version=row.version,
    )


class OutboxRelay:
    """Moves outbox rows to the bus. Wakes when poked (after a local write) and polls every
    `poll_s` for rows other processes wrote. Rows that fail `MAX_ATTEMPTS` times are parked
    with their error (a dead letter) instead of blocking the ones behind them."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], bus: EventBus, poll_s: float = 1.0):
        self._sessions = sessions
        self._bus = bus
        self._poll_s = poll_s
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def poke(self) -> None:
        """Ask for a relay pass soon."""
        self._wakeup.set()

    def start(self) -> None:
        """Begin relaying in the background."""
        self._task = asyncio.create_task(self._run(), name="outbox-relay")

    async def close(self) -> None:
        """Stop relaying (after one last pass)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.relay_once()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=self._poll_s)
            self._wakeup.clear()
            try:
                while await self.relay_once() == BATCH:
                    pass
            except Exception:
                log.exception("outbox relay pass failed")

    async def deliver(self, events: list[Event]) -> None:
        """Publish events this process has just committed to the outbox, without reading them back;
        on failure they stay unpublished and the polling pass retries them."""
        async with self._lock:
            try:
                await self._bus.publish(events)
            except Exception as exc:
                log.warning("direct delivery of %d events failed (%r); relay will retry", len(events), exc)
                return
            async with self._sessions() as session, session.begin():
                await session.execute(
                    update(OutboxEvent)
                    .where(OutboxEvent.id.in_([e.id for e in events]), OutboxEvent.published_at.is_(None))
                    .values(published_at=utcnow())
                )

    async def relay_once(self) -> int:
        """Publish one batch of unpublished rows; returns how many were taken."""
        async with self._lock, self._sessions() as session, session.begin():
            query = (
                select(OutboxEvent)
                .where(OutboxEvent.published_at.is_(None))
                .order_by(OutboxEvent.seq)
                .limit(BATCH)
            )
            if session.get_bind().dialect.name == "postgresql":
                # Replicas share the outbox: each row goes to one relay at a time.
                query = query.with_for_update(skip_locked=True)
            rows = list((await session.scalars(query)).all())
            if not rows:
                return 0
            now = utcnow()
            try:
                await self._bus.publish([_event(r) for r in rows])
                delivered = rows
            except Exception:
                # Isolate the poison: deliver one by one, so good events are not held back.
                delivered = []
                for row in rows:
                    try:
                        await self._bus.publish([_event(row)])
                    except Exception as exc:
                        log.warning("event %s (%s) failed: %r", row.id, row.type, exc)
                        row.attempts += 1
                        row.last_error = repr(exc)[:2000]
                        if row.attempts >= MAX_ATTEMPTS:
                            row.published_at = now  # parked as a dead letter, error kept
                    else:
                        delivered.append(row)
            if delivered:
                await session.execute(
                    update(OutboxEvent)
                    .where(OutboxEvent.seq.in_([r.seq for r in delivered]))
                    .values(published_at=now)
                )
            return len(rows)
