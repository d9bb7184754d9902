"""The outbox end to end on a real database: producers stage events, the relay publishes them through the
in-process bus, and the app's converted consumers (usage, audit) apply each once."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.analytics.tables import UsageRecord
from somaagent.analytics.usage import store_usage, usage_by_model_day
from somaagent.audit.consumer import append_audit
from somaagent.audit.tables import AuditRecord
from somaagent.events.consumers import ConsumerSpec
from somaagent.events.inprocess import InProcessBus
from somaagent.events.outbox import BufferedEmitter, audit
from somaagent.events.relay import OutboxRelay
from somaagent.events.schemas import AUDIT_EVENTS, MODEL_USAGE
from somaagent.events.tables import OutboxEvent
from tests.events.sample_events import new_runner, usage_event


def app_bus(sessions: async_sessionmaker[AsyncSession]) -> InProcessBus:
    """The in-process bus with the consumers app.py subscribes."""
    runner, _ = new_runner(sessions)
    bus = InProcessBus(runner)
    bus.subscribe(ConsumerSpec("usage", (MODEL_USAGE,), store_usage))
    bus.subscribe(ConsumerSpec("audit", (AUDIT_EVENTS,), append_audit))
    return bus


async def test_usage_consumer_applies_each_event_once(sessions: async_sessionmaker[AsyncSession]) -> None:
    runner, _ = new_runner(sessions)
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


async def test_audit_facts_reach_the_log_through_the_relay(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    relay = OutboxRelay(sessions, app_bus(sessions))
    async with sessions() as session, session.begin():
        audit(session, "user:u1", "ten_a", "user.created", user_id="u1")
        audit(session, "cli", None, "tenant.created", name="acme")
    assert await relay.drain() == 2
    assert await relay.drain() == 0
    async with sessions() as session:
        logged = (await session.scalars(select(AuditRecord).order_by(AuditRecord.type))).all()
        pending = await session.scalar(
            select(func.count()).select_from(OutboxEvent).where(OutboxEvent.published_at.is_(None))
        )
    assert [(r.type, r.tenant_id, r.actor) for r in logged] == [
        ("tenant.created", None, "cli"),
        ("user.created", "ten_a", "user:u1"),
    ]
    assert pending == 0


async def test_buffered_emitter_flushes_in_batches_and_its_events_are_applied_on_flush(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    relay = OutboxRelay(sessions, app_bus(sessions))
    emitter = BufferedEmitter(sessions, flush_ms=20, on_flushed=relay.deliver)
    emitter.start()
    for i in range(50):
        emitter.emit(usage_event("ten_c", f"m{i % 2}", 1, 1))
    await emitter.flush()  # read-your-writes: applied by the in-process consumer when flush returns
    async with sessions() as session:
        assert await session.scalar(select(func.count()).select_from(UsageRecord)) == 50
    emitter.emit(usage_event("ten_c", "m0", 1, 1))
    await emitter.close()
    async with sessions() as session:
        assert await session.scalar(select(func.count()).select_from(OutboxEvent)) == 51
        assert await session.scalar(select(func.count()).select_from(UsageRecord)) == 51
