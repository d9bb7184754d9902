"""The outbox relay and the usage consumer on a real database: at-least-once delivery, idempotent
consumers, and poison events parked with their error instead of blocking the rest."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.analytics.tables import UsageRecord
from somaagent.analytics.usage import UsageConsumer, usage_by_model_day
from somaagent.events.bus import InProcessBus
from somaagent.events.outbox import BufferedEmitter, add_event
from somaagent.events.relay import MAX_ATTEMPTS, OutboxRelay
from somaagent.events.schemas import MODEL_USAGE, Event
from somaagent.events.tables import OutboxEvent


def usage_event(tenant: str, model: str, prompt: int, completion: int) -> Event:
    return Event(
        topic=MODEL_USAGE,
        type="model.usage",
        tenant_id=tenant,
        actor="key:test",
        data={
            "request_id": "req_x",
            "tenant_id": tenant,
            "key_id": None,
            "model": model,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "latency_ms": 5,
            "status": "ok",
        },
    )


async def test_usage_consumer_is_idempotent_by_event_id(sessions: async_sessionmaker[AsyncSession]) -> None:
    consumer = UsageConsumer(sessions)
    events = [
        usage_event("ten_a", "m1", 10, 2),
        usage_event("ten_a", "m1", 5, 1),
        usage_event("ten_b", "m1", 7, 7),
    ]
    await consumer(events)
    await consumer(events)  # redelivered
    await consumer(events[:1])
    async with sessions() as session:
        assert await session.scalar(select(func.count()).select_from(UsageRecord)) == 3
        rows = await usage_by_model_day(session, "ten_a")
    assert [(r.model, r.requests, r.prompt_tokens, r.completion_tokens) for r in rows] == [("m1", 2, 15, 3)]


async def test_relay_delivers_in_order_and_parks_poison(sessions: async_sessionmaker[AsyncSession]) -> None:
    bus = InProcessBus()
    seen: list[str] = []

    async def picky(batch: Sequence[Event]) -> None:
        for event in batch:
            if event.data.get("poison"):
                raise ValueError("cannot digest this")
        seen.extend(e.id for e in batch)

    bus.subscribe("test.topic", picky)
    good = [Event(topic="test.topic", type="t", tenant_id="ten", actor=None, data={"n": i}) for i in range(3)]
    bad = Event(topic="test.topic", type="t", tenant_id="ten", actor=None, data={"poison": True})
    async with sessions() as session, session.begin():
        for event in (good[0], bad, good[1], good[2]):
            add_event(session, event)
    relay = OutboxRelay(sessions, bus)
    for _ in range(MAX_ATTEMPTS):
        await relay.relay_once()
    assert seen == [e.id for e in good]  # in order, the poison skipped, nothing delivered twice
    async with sessions() as session:
        parked = await session.scalar(select(OutboxEvent).where(OutboxEvent.id == bad.id))
        assert parked is not None
        assert parked.attempts == MAX_ATTEMPTS
        assert parked.published_at is not None
        assert "cannot digest this" in (parked.last_error or "")
    assert await relay.relay_once() == 0


async def test_buffered_emitter_flushes_in_batches_and_on_close(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    emitter = BufferedEmitter(sessions, flush_ms=20)
    emitter.start()
    for i in range(50):
        emitter.emit(usage_event("ten_c", f"m{i % 2}", 1, 1))
    await emitter.close()
    async with sessions() as session:
        assert await session.scalar(select(func.count()).select_from(OutboxEvent)) == 50
