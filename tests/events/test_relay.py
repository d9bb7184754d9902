"""The outbox relay on a real database and the in-process bus: `seq` order (so per-tenant order), a bad
event isolated, counted and parked with a dead letter while the others go on, one relay at a time on
PostgreSQL, and published rows pruned after the retention."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.core.clock import utcnow
from somaagent.events.catalog import DEAD_LETTERED
from somaagent.events.consumers import ConsumerSpec
from somaagent.events.inprocess import InProcessBus
from somaagent.events.relay import BATCH, MAX_ATTEMPTS, RELAY_GROUP, OutboxRelay
from somaagent.events.schemas import MODEL_USAGE, Event
from somaagent.events.tables import OutboxEvent
from tests.events.sample_events import new_runner, outbox_rows, stage, usage_event


class Seen:
    """A handler remembering, per tenant, the order events reached it."""

    def __init__(self) -> None:
        self.order: list[str] = []

    async def __call__(self, session: AsyncSession, events: Sequence[Event]) -> None:
        self.order.extend(e.id for e in events)


def relay_with(
    sessions: async_sessionmaker[AsyncSession], seen: Seen, max_event_bytes: int = 32_768
) -> OutboxRelay:
    runner, _ = new_runner(sessions)
    bus = InProcessBus(runner, max_event_bytes=max_event_bytes)
    bus.subscribe(ConsumerSpec("seen", (MODEL_USAGE,), seen))
    return OutboxRelay(sessions, bus, retention_days=1)


async def test_rows_are_published_in_seq_order_across_batches(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    seen = Seen()
    relay = relay_with(sessions, seen)
    events = [usage_event(f"ten_{i % 4}", prompt=i) for i in range(BATCH + 120)]
    await stage(sessions, events)
    assert await relay.drain() == len(events)
    assert seen.order == [e.id for e in events]
    assert await relay.relay_once() == 0


async def test_a_bad_event_is_parked_with_a_dead_letter_and_holds_back_only_its_tenant(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    seen = Seen()
    relay = relay_with(sessions, seen)
    a1, b1 = usage_event("ten_a"), usage_event("ten_b")
    too_big = usage_event("ten_a", request_note="x" * 100_000)  # over the bus's 32 KiB
    a2, b2 = usage_event("ten_a"), usage_event("ten_b")
    await stage(sessions, [a1, b1, too_big, a2, b2])
    await relay.relay_once()
    # Tenant b is not held up; tenant a's later event waits behind its failing one (order kept).
    assert seen.order == [a1.id, b1.id, b2.id]
    for _ in range(MAX_ATTEMPTS - 1):
        await relay.relay_once()
    assert seen.order == [a1.id, b1.id, b2.id, a2.id]
    async with sessions() as session:
        parked = await session.scalar(select(OutboxEvent).where(OutboxEvent.id == too_big.id))
    assert parked is not None
    assert parked.attempts == MAX_ATTEMPTS and parked.published_at is not None
    assert "EventTooLarge" in (parked.last_error or "") and "32768" in (parked.last_error or "")
    dead = await outbox_rows(sessions, MODEL_USAGE + ".dlq")
    assert len(dead) == 1
    assert dead[0].type == DEAD_LETTERED and dead[0].tenant_id == "ten_a"
    assert dead[0].data["group"] == RELAY_GROUP and dead[0].data["topic"] == MODEL_USAGE
    # The envelope without its oversized data (the row keeps all of it until pruned).
    assert dead[0].data["event"]["id"] == too_big.id and dead[0].data["event"]["type"] == "model.usage"
    assert dead[0].data["event"]["data"]["omitted_bytes"] > 100_000
    # The dead letter itself is published on the next pass (nobody here consumes the dlq topic).
    assert await relay.drain() == 1
    assert await relay.relay_once() == 0


async def test_a_failing_row_counts_attempts_only_while_it_fails(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    seen = Seen()
    relay = relay_with(sessions, seen)
    big = usage_event("ten_a", note="y" * 40_000)
    await stage(sessions, [big])
    await relay.relay_once()
    await relay.relay_once()
    async with sessions() as session:
        row = await session.scalar(select(OutboxEvent).where(OutboxEvent.id == big.id))
    assert row is not None and row.attempts == 2 and row.published_at is None
    # The operator raises the limit (a real deployment: the broker's max payload): it goes out next pass.
    roomy = relay_with(sessions, seen, max_event_bytes=1 << 20)
    assert await roomy.relay_once() == 1
    assert seen.order == [big.id]


async def test_deliver_runs_a_pass_so_older_pending_rows_go_first(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    seen = Seen()
    relay = relay_with(sessions, seen)
    older = [usage_event("ten_a") for _ in range(3)]
    await stage(sessions, older)
    newer = [usage_event("ten_a") for _ in range(2)]
    await stage(sessions, newer)
    await relay.deliver(newer)
    assert seen.order == [e.id for e in older + newer]


async def test_one_relay_at_a_time_on_postgres(
    backend: str, sessions: async_sessionmaker[AsyncSession]
) -> None:
    seen = Seen()
    relay = relay_with(sessions, seen)
    events = [usage_event("ten_a") for _ in range(3)]
    await stage(sessions, events)
    async with sessions() as other, other.begin():
        if backend == "postgres":
            # Another replica's relay holds the lock for its pass: this one skips, publishing nothing.
            assert await other.scalar(text("SELECT pg_try_advisory_xact_lock(1936682337)"))
            assert await relay.relay_once() == 0
            assert seen.order == []
        else:
            assert await relay.relay_once() == 3  # SQLite: one writer, no lock to take
    await relay.drain()
    assert seen.order == [e.id for e in events]


async def test_published_rows_older_than_the_retention_are_pruned(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    seen = Seen()
    relay = relay_with(sessions, seen)  # retention 1 day
    old_published, recent, old_pending = usage_event("ten_a"), usage_event("ten_a"), usage_event("ten_a")
    await stage(sessions, [old_published, recent])
    await relay.drain()
    await stage(sessions, [old_pending])
    async with sessions() as session, session.begin():
        await session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.id.in_([old_published.id, old_pending.id]))
            .values(published_at=utcnow() - timedelta(days=2))
        )
        await session.execute(
            update(OutboxEvent).where(OutboxEvent.id == old_pending.id).values(published_at=None)
        )
    assert await relay.prune() == 1
    async with sessions() as session:
        left = set((await session.scalars(select(OutboxEvent.id))).all())
        count = await session.scalar(select(func.count()).select_from(OutboxEvent))
    assert left == {recent.id, old_pending.id} and count == 2
