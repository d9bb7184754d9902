"""The outbox relay, the consumer runner and the usage consumer on a real database: at-least-once
delivery applied once per group, in order, and poison events dead-lettered with their error instead of
blocking the rest."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.analytics.tables import UsageRecord
from somaagent.analytics.usage import store_usage, usage_by_model_day
from somaagent.events.consumers import ConsumerSpec
from somaagent.events.inprocess import InProcessBus
from somaagent.events.outbox import BufferedEmitter, add_event
from somaagent.events.relay import OutboxRelay
from somaagent.events.runner import ConsumerRunner
from somaagent.events.schemas import DEAD_LETTER_SUFFIX, MODEL_USAGE, Event
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
            "kind": "chat",
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "latency_ms": 5,
            "status": "ok",
        },
    )


def runner_on(sessions: async_sessionmaker[AsyncSession]) -> ConsumerRunner:
    return ConsumerRunner(sessions, attempts=2, on_outbox=lambda: None)


async def test_usage_is_applied_once_however_often_delivered(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    runner = runner_on(sessions)
    spec = ConsumerSpec("usage", (MODEL_USAGE,), store_usage)
    events = [
        usage_event("ten_a", "m1", 10, 2),
        usage_event("ten_a", "m1", 5, 1),
        usage_event("ten_b", "m1", 7, 7),
    ]
    await runner.handle_events(spec, MODEL_USAGE, events)
    await runner.handle_events(spec, MODEL_USAGE, events)  # redelivered
    await runner.handle_events(spec, MODEL_USAGE, events[:1])
    async with sessions() as session:
        assert await session.scalar(select(func.count()).select_from(UsageRecord)) == 3
        rows = await usage_by_model_day(session, "ten_a")
    assert [(r.model, r.requests, r.prompt_tokens, r.completion_tokens) for r in rows] == [("m1", 2, 15, 3)]


async def test_relay_delivers_in_order_and_dead_letters_poison(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    seen: list[str] = []

    async def picky(session: AsyncSession, batch: Sequence[Event]) -> None:
        for event in batch:
            if event.data["model"] == "poison":
                raise ValueError("cannot digest this")
        seen.extend(e.id for e in batch)

    bus = InProcessBus(runner_on(sessions))
    bus.subscribe(ConsumerSpec("picky", (MODEL_USAGE,), picky))
    good = [usage_event("ten", f"m{i}", i, i) for i in range(3)]
    bad = usage_event("ten", "poison", 1, 1)
    wrong_version = replace(usage_event("ten", "m9", 1, 1), version=99)
    async with sessions() as session, session.begin():
        for event in (good[0], bad, good[1], wrong_version, good[2]):
            add_event(session, event)
    relay = OutboxRelay(sessions, bus)
    while await relay.relay_once():
        pass
    assert seen == [e.id for e in good]  # in order, the poison skipped, nothing delivered twice
    async with sessions() as session:
        letters = list(
            await session.scalars(
                select(OutboxEvent).where(OutboxEvent.topic == MODEL_USAGE + DEAD_LETTER_SUFFIX)
            )
        )
        pending = await session.scalar(
            select(func.count()).select_from(OutboxEvent).where(OutboxEvent.published_at.is_(None))
        )
    by_event = {letter.data["event"]["id"]: letter.data for letter in letters}
    assert set(by_event) == {bad.id, wrong_version.id}
    assert "cannot digest this" in by_event[bad.id]["error"]
    assert by_event[bad.id]["group"] == "picky"
    assert pending == 0
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
