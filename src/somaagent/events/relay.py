"""The outbox relay: publishes committed outbox rows to the bus in `seq` order, at least once.

Owns: `OutboxRelay` (publishing, backoff through broker outages, parking bad events, pruning).
May import: events, db, core. Never: a broker client (it sees the `EventBus` port only).

Order: rows go out in `seq` order; a row that fails holds back the later rows of its tenant until it
is published or parked, so each tenant's events stay in order. On PostgreSQL one relay publishes at a
time across replicas (a transaction-scoped advisory lock; the others skip the pass).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import orjson
from sqlalchemy import delete, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.core.clock import utcnow
from somaagent.events.bus import BusUnavailable, EventBus
from somaagent.events.catalog import DEAD_LETTERED
from somaagent.events.outbox import insert_events
from somaagent.events.schemas import DEAD_LETTER_SUFFIX, Event
from somaagent.events.tables import OutboxEvent

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5
BATCH = 2000
RELAY_GROUP = "relay"  # the `group` named in dead letters of events the bus itself refused
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0
PRUNE_EVERY_S = 60.0
# pg_try_advisory_xact_lock key of the relay ("soma" in ASCII): one publisher across replicas.
_RELAY_LOCK_KEY = 0x736F6D61
_KEPT_DATA_BYTES = 64 * 1024

_COLUMNS = (
    OutboxEvent.seq,
    OutboxEvent.id,
    OutboxEvent.topic,
    OutboxEvent.type,
    OutboxEvent.version,
    OutboxEvent.tenant_id,
    OutboxEvent.actor,
    OutboxEvent.occurred_at,
    OutboxEvent.data,
    OutboxEvent.attempts,
)


def event_of(row: Any) -> Event:
    """The event an outbox row (ORM object or row with the outbox columns) holds."""
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
    """Moves outbox rows to the bus. Wakes when poked (after a local write) and polls every `poll_s` for
    rows other processes wrote. A broker outage (`BusUnavailable`) leaves rows pending, uncounted, and
    backs off 0.1 s doubling to 5 s; any other failure counts against the row, which is parked (marked
    published with its error, and a dead letter staged on `<topic>.dlq`) after `MAX_ATTEMPTS`."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        bus: EventBus,
        poll_s: float = 1.0,
        *,
        retention_days: float = 7,
    ) -> None:
        self._sessions = sessions
        self._bus = bus
        self._poll_s = poll_s
        self._retention = timedelta(days=retention_days)
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._backoff_s = 0.0  # 0 = the bus answered last time
        self._retry_at = 0.0  # monotonic time before which passes wait out an outage
        self._pruned_at = 0.0

    @property
    def backoff_s(self) -> float:
        """The current outage backoff (0 when the bus is taking events)."""
        return self._backoff_s

    def poke(self) -> None:
        """Ask for a relay pass soon."""
        self._wakeup.set()

    def start(self) -> None:
        """Begin relaying in the background."""
        self._task = asyncio.create_task(self._run(), name="outbox-relay")

    async def close(self) -> None:
        """Stop relaying (after one last pass, unless the bus is down)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(BusUnavailable):
            await self.drain()

    async def deliver(self, events: list[Event]) -> None:
        """Called once `events` are committed to the outbox: run a relay pass now (so a local consumer
        has applied them when this returns) rather than publish them out of `seq` order. Never raises:
        what is not published now stays pending for the background loop."""
        del events  # they are in the outbox; the pass publishes them in order with the rows before them
        if time.monotonic() < self._retry_at:
            self.poke()
            return
        try:
            await self.drain()
        except BusUnavailable as exc:
            self._note_outage(exc)
            self.poke()
        except Exception:
            log.exception("relay pass after a flush failed; the background loop retries")
            self.poke()

    async def catch_up(self) -> None:
        """Read-your-writes before a read: one relay pass, so a local consumer has applied what this
        process just committed. Never raises for the bus: during an outage (or its backoff) the read
        answers from what is recorded, and the rows stay pending for the background loop."""
        if time.monotonic() < self._retry_at:
            return
        try:
            await self.relay_once()
        except BusUnavailable as exc:
            self._note_outage(exc)
            self.poke()

    async def drain(self) -> int:
        """Relay passes until the outbox has no more pending rows this relay may publish; returns how
        many rows were taken. Raises `BusUnavailable` (rows stay pending) when the bus is down."""
        total = 0
        while True:
            taken = await self.relay_once()
            total += taken
            if taken < BATCH:
                return total

    async def _run(self) -> None:
        while True:
            delay = self._retry_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # an outage: wait out the backoff, pokes or not
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout=self._poll_s)
            self._wakeup.clear()
            try:
                await self.drain()
            except BusUnavailable as exc:
                self._note_outage(exc)
            except Exception:
                log.exception("outbox relay pass failed")
            try:
                await self._prune_if_due()
            except Exception:
                log.exception("outbox prune failed")

    def _note_outage(self, exc: BusUnavailable) -> None:
        self._backoff_s = min(BACKOFF_MAX_S, max(BACKOFF_FIRST_S, self._backoff_s * 2))
        self._retry_at = time.monotonic() + self._backoff_s
        log.warning("event bus unavailable (%s); retrying in %.1f s", exc, self._backoff_s)

    def _note_success(self) -> None:
        if self._backoff_s:
            log.info("event bus available again")
        self._backoff_s = 0.0
        self._retry_at = 0.0

    async def relay_once(self) -> int:
        """Publish one batch of pending rows in `seq` order; returns how many were taken (0 also when
        another replica holds the relay lock). Raises `BusUnavailable` after recording what went out."""
        async with self._lock:
            outage: BusUnavailable | None = None
            async with self._sessions() as session, session.begin():
                if not await _take_relay_lock(session):
                    return 0
                query = (
                    select(*_COLUMNS)
                    .where(OutboxEvent.published_at.is_(None))
                    .order_by(OutboxEvent.seq)
                    .limit(BATCH)
                )
                rows = list((await session.execute(query)).all())
                if not rows:
                    self._note_success()
                    return 0
                failed: list[tuple[Any, Exception]] = []
                try:
                    delivered = await self._publish(rows, failed)
                except _Outage as stop:
                    delivered, outage = stop.delivered, stop.cause
                # Written only after publishing: on SQLite a write here would hold the one write lock
                # while in-process consumers (other sessions) wait for it.
                for row, exc in failed:
                    await _count_failure(session, row, exc)
                if delivered:
                    await session.execute(
                        update(OutboxEvent)
                        .where(OutboxEvent.seq.in_(delivered))
                        .values(published_at=utcnow())
                    )
            if outage is not None:
                raise outage
            self._note_success()
            return len(rows)

    async def _publish(self, rows: Sequence[Any], failed: list[tuple[Any, Exception]]) -> list[int]:
        """Publish `rows`; returns the seqs that went out and adds the rows that failed to `failed`. One
        call for the batch; on a bad event, one call per row, holding back the later rows of a failing
        row's tenant (unless this failure parks it: then the rows behind it go on)."""
        try:
            await self._bus.publish([event_of(r) for r in rows])
            return [r.seq for r in rows]
        except BusUnavailable as exc:
            raise _Outage([], exc) from exc
        except Exception as exc:
            log.warning("publishing a batch of %d failed (%r); isolating the bad event", len(rows), exc)
        delivered: list[int] = []
        held: set[str | None] = set()  # tenants with a failing row pending before their later rows
        for row in rows:
            if row.tenant_id in held:
                continue
            try:
                await self._bus.publish([event_of(row)])
            except BusUnavailable as exc:
                raise _Outage(delivered, exc) from exc
            except Exception as exc:
                failed.append((row, exc))
                if row.attempts + 1 < MAX_ATTEMPTS:
                    held.add(row.tenant_id)
            else:
                delivered.append(row.seq)
        return delivered

    async def _prune_if_due(self) -> None:
        now = time.monotonic()
        if now - self._pruned_at < PRUNE_EVERY_S:
            return
        self._pruned_at = now
        pruned = await self.prune()
        if pruned:
            log.info("pruned %d published outbox rows older than %s", pruned, self._retention)

    async def prune(self) -> int:
        """Delete published rows older than the retention; returns how many."""
        cutoff = utcnow() - self._retention
        async with self._sessions() as session, session.begin():
            result: Any = await session.execute(delete(OutboxEvent).where(OutboxEvent.published_at < cutoff))
            return int(result.rowcount or 0)


class _Outage(Exception):
    """The bus went down mid-pass: `delivered` went out before it did."""

    def __init__(self, delivered: list[int], cause: BusUnavailable) -> None:
        super().__init__(str(cause))
        self.delivered = delivered
        self.cause = cause


def _kept_envelope(row: Any) -> dict[str, Any]:
    """The envelope a relay dead letter keeps: whole, or without its data when that alone is too big to
    publish (the row itself stays in the outbox, with all of it, until pruned)."""
    envelope = event_of(row).to_json()
    size = len(orjson.dumps(envelope["data"]))
    if size > _KEPT_DATA_BYTES:
        envelope["data"] = {"omitted_bytes": size}
    return envelope


async def _take_relay_lock(session: AsyncSession) -> bool:
    """On PostgreSQL, whether this transaction is the one relay publishing now (SQLite has one writer)."""
    if session.get_bind().dialect.name != "postgresql":
        return True
    got = await session.scalar(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": _RELAY_LOCK_KEY})
    return bool(got)


async def _count_failure(session: AsyncSession, row: Any, exc: Exception) -> bool:
    """Count a failed publish of `row`; park it after `MAX_ATTEMPTS` (published with the error, and a
    dead letter staged). Returns whether it was parked."""
    attempts = row.attempts + 1
    error = repr(exc)[:2000]
    parked = bool(attempts >= MAX_ATTEMPTS)
    log.warning(
        "event %s (%s) failed to publish (%d/%d): %s", row.id, row.type, attempts, MAX_ATTEMPTS, error
    )
    values: dict[str, Any] = {"attempts": attempts, "last_error": error}
    if parked:
        values["published_at"] = utcnow()
    await session.execute(update(OutboxEvent).where(OutboxEvent.seq == row.seq).values(**values))
    # A dead letter's own dead letter would only repeat it: parked dead letters stay in the outbox.
    if parked and not row.topic.endswith(DEAD_LETTER_SUFFIX):
        dead = Event(
            topic=row.topic + DEAD_LETTER_SUFFIX,
            type=DEAD_LETTERED,
            tenant_id=row.tenant_id,
            actor=None,
            data={"group": RELAY_GROUP, "topic": row.topic, "error": error, "event": _kept_envelope(row)},
        )
        await insert_events(session, [dead])
    return parked
