"""The broker adapters, black-box, against real brokers: KafkaBus on tansu and NatsBus on nats-server,
each with the real ConsumerRunner, the real OutboxRelay and a real database (SQLite and PostgreSQL).

The handler is the real `usage` consumer (`store_usage` → `usage_records`); the tests observe what it
was given and what the database and the broker hold.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import orjson
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.analytics.tables import UsageRecord
from somaagent.analytics.usage import store_usage
from somaagent.events.bus import EventBus
from somaagent.events.consumers import ConsumerSpec
from somaagent.events.kafka import KafkaBus
from somaagent.events.nats import NatsBus, durable_name, stream_name
from somaagent.events.outbox import insert_events
from somaagent.events.relay import OutboxRelay
from somaagent.events.runner import ConsumerRunner
from somaagent.events.schemas import DEAD_LETTER_SUFFIX, MODEL_USAGE, Event
from somaagent.events.tables import OutboxEvent, ProcessedEvent
from tests.support.brokers import (
    BrokerProcess,
    kafka_committed,
    kafka_publish_raw,
    nats_delete_stream,
    nats_publish_raw,
    nats_unacked,
    require_shared_nats,
    start_nats_server,
    start_tansu,
    unique_name,
)

BROKERS = [
    pytest.param("kafka", id="kafka", marks=pytest.mark.kafka),
    pytest.param("nats", id="nats", marks=pytest.mark.nats),
]


@dataclass
class Broker:
    """One real broker and how to reach it, independent of the adapter."""

    kind: str
    make_bus: Callable[[ConsumerRunner], EventBus]
    publish_raw: Callable[[str, bytes], Awaitable[None]]
    unacked: Callable[[str, str, int], Awaitable[int]]  # (group, topic, published) → not yet acknowledged
    process: BrokerProcess | None = None  # a broker the test owns (stop/start for the outage test)
    cleanup: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


def _kafka() -> Iterator[Broker]:
    tansu = start_tansu()  # one fresh broker per test: groups start from an empty log

    async def unacked(group: str, topic: str, published: int) -> int:
        return published - await kafka_committed(tansu.bootstrap, group, topic)

    try:
        yield Broker(
            "kafka",
            lambda runner: KafkaBus(tansu.bootstrap, runner, client_id=unique_name("soma-test-")),
            lambda topic, payload: kafka_publish_raw(tansu.bootstrap, topic, payload),
            unacked,
            tansu,
        )
    finally:
        tansu.close()


def _nats(url: str, process: BrokerProcess | None) -> Iterator[Broker]:
    prefix = unique_name("t")  # a stream of its own on the shared server

    async def unacked(group: str, topic: str, published: int) -> int:
        del published
        return await nats_unacked(url, stream_name(prefix), durable_name(group, topic))

    broker = Broker(
        "nats",
        lambda runner: NatsBus(url, runner, prefix=prefix),
        lambda topic, payload: nats_publish_raw(url, f"{prefix}.{topic}", payload),
        unacked,
        process,
    )
    yield broker
    if process is None:
        asyncio.run(nats_delete_stream(url, stream_name(prefix)))


@pytest.fixture(params=BROKERS)
def broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    if request.param == "kafka":
        yield from _kafka()
    else:
        yield from _nats(require_shared_nats(), None)


@pytest.fixture(params=BROKERS)
def restartable_broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    if request.param == "kafka":
        yield from _kafka()
        return
    server = start_nats_server()  # our own: the test stops and restarts it
    try:
        yield from _nats(server.url, server)
    finally:
        server.close()


def usage_event(tenant: str, n: int) -> Event:
    return Event(
        topic=MODEL_USAGE,
        type="model.usage",
        tenant_id=tenant,
        actor="key:test",
        data={
            "request_id": f"req_{n:06d}",
            "tenant_id": tenant,
            "key_id": "key_test",
            "model": "smollm2",
            "kind": "chat",
            "prompt_tokens": 10 + n % 7,
            "completion_tokens": 3 + n % 5,
            "latency_ms": 20,
            "status": "ok",
        },
    )


@dataclass
class Running:
    bus: EventBus
    relay: OutboxRelay
    seen: list[Event]  # what the handler was given, in order (committed batches only: no failures here)


@asynccontextmanager
async def running(
    broker: Broker, sessions: async_sessionmaker[AsyncSession], group: str
) -> AsyncIterator[Running]:
    """A bus with the `usage` handler as `group`, a runner and a relay, started; closed on exit."""
    seen: list[Event] = []

    async def handle(session: AsyncSession, events: Sequence[Event]) -> None:
        await store_usage(session, events)
        seen.extend(events)

    runner = ConsumerRunner(sessions, attempts=3, on_outbox=lambda: relay.poke())
    bus = broker.make_bus(runner)
    bus.subscribe(ConsumerSpec(group, (MODEL_USAGE,), handle))
    relay = OutboxRelay(sessions, bus, poll_s=0.2)
    await bus.start()
    relay.start()
    try:
        yield Running(bus, relay, seen)
    finally:
        await relay.close()
        await bus.close()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")


async def count(sessions: async_sessionmaker[AsyncSession], query: object) -> int:
    async with sessions() as session:
        return int(await session.scalar(query) or 0)  # type: ignore[call-overload]


def usage_rows() -> object:
    return select(func.count()).select_from(UsageRecord)


def marks(group: str) -> object:
    return select(func.count()).select_from(ProcessedEvent).where(ProcessedEvent.group == group)


def pending() -> object:
    return select(func.count()).select_from(OutboxEvent).where(OutboxEvent.published_at.is_(None))


async def test_published_events_reach_the_handler_once(
    broker: Broker, sessions: async_sessionmaker[AsyncSession]
) -> None:
    group = unique_name("g")
    events = [usage_event(f"ten_{i % 3}", i) for i in range(120)]
    async with running(broker, sessions, group) as run:
        for start in range(0, len(events), 40):
            await run.bus.publish(events[start : start + 40])
        await eventually(lambda: _equals(count(sessions, usage_rows()), 120), what="120 usage rows")
        # At least once on the wire: the same events published again are skipped by the runner.
        await run.bus.publish(events[:40])
        await eventually(lambda: _equals(broker.unacked(group, MODEL_USAGE, 160), 0), what="all acked")
        assert await count(sessions, usage_rows()) == 120
        assert await count(sessions, marks(group)) == 120
        assert sorted(e.id for e in run.seen) == sorted(e.id for e in events)  # each given once


async def test_a_new_bus_of_the_group_resumes_where_the_last_one_acknowledged(
    broker: Broker, sessions: async_sessionmaker[AsyncSession]
) -> None:
    group = unique_name("g")
    first = [usage_event("ten_a", i) for i in range(30)]
    second = [usage_event("ten_a", 100 + i) for i in range(30)]
    async with running(broker, sessions, group) as run:
        await run.bus.publish(first)
        await eventually(lambda: _equals(broker.unacked(group, MODEL_USAGE, 30), 0), what="first acked")
    async with running(broker, sessions, group) as run:  # a restart of the consuming process
        await run.bus.publish(second)
        await eventually(lambda: _equals(count(sessions, usage_rows()), 60), what="60 usage rows")
        await eventually(lambda: _equals(broker.unacked(group, MODEL_USAGE, 60), 0), what="second acked")
        assert [e.id for e in run.seen] == [e.id for e in second]  # nothing of the first run again
    assert await count(sessions, marks(group)) == 60


async def test_a_poison_payload_lands_on_the_dead_letter_topic(
    broker: Broker, sessions: async_sessionmaker[AsyncSession]
) -> None:
    group = unique_name("g")
    poison = b"\x00not an event{"
    good = usage_event("ten_a", 1)
    async with running(broker, sessions, group) as run:
        await broker.publish_raw(MODEL_USAGE, poison)
        await run.bus.publish([good])
        await eventually(lambda: _equals(count(sessions, usage_rows()), 1), what="the good event applied")

        async def first_dead_letter() -> Event:
            async for event in run.bus.tail(MODEL_USAGE + DEAD_LETTER_SUFFIX, from_beginning=True, limit=1):
                return event
            raise AssertionError("tail ended without an event")

        dead = await asyncio.wait_for(first_dead_letter(), timeout=30)
    assert dead.type == "event.dead_lettered"
    assert dead.data["group"] == group
    assert dead.data["topic"] == MODEL_USAGE
    assert base64.b64decode(dead.data["payload_b64"]) == poison
    assert "envelope invalid" in dead.data["error"]
    assert [e.id for e in run.seen] == [good.id]


async def test_each_tenant_s_events_are_handled_in_publish_order(
    broker: Broker, sessions: async_sessionmaker[AsyncSession]
) -> None:
    group = unique_name("g")
    tenants = ["ten_a", "ten_b", "ten_c", "ten_d"]
    events = [usage_event(tenant, n) for n in range(80) for tenant in tenants]
    async with running(broker, sessions, group) as run:
        for start in range(0, len(events), 37):  # batches that cut across tenants
            await run.bus.publish(events[start : start + 37])
        await eventually(lambda: _equals(count(sessions, usage_rows()), len(events)), what="all applied")
        for tenant in tenants:
            mine = [e.data["request_id"] for e in run.seen if e.tenant_id == tenant]
            assert mine == [f"req_{n:06d}" for n in range(80)], tenant


async def test_outage_events_accumulate_in_the_outbox_and_drain_once(
    restartable_broker: Broker, sessions: async_sessionmaker[AsyncSession]
) -> None:
    broker = restartable_broker
    assert broker.process is not None
    group = unique_name("g")
    before = [usage_event(f"ten_{i % 2}", i) for i in range(20)]
    during = [usage_event(f"ten_{i % 2}", 1000 + i) for i in range(50)]
    async with running(broker, sessions, group) as run:
        await _write_outbox(sessions, before)
        run.relay.poke()
        await eventually(lambda: _equals(count(sessions, usage_rows()), 20), what="20 before the outage")

        await asyncio.to_thread(broker.process.stop)
        await _write_outbox(sessions, during)
        run.relay.poke()
        await eventually(lambda: _positive(run.relay.backoff_s), what="the relay saw the outage")
        await asyncio.sleep(1.0)
        await run.relay.catch_up()  # what a read runs first: it answers from what is recorded, no error
        assert await count(sessions, pending()) == 50  # accumulated, none lost, none counted as failed
        assert await count(sessions, usage_rows()) == 20

        await asyncio.to_thread(broker.process.start)
        await eventually(lambda: _equals(count(sessions, pending()), 0), timeout=60, what="outbox drained")
        await eventually(lambda: _equals(count(sessions, usage_rows()), 70), timeout=60, what="all consumed")
        assert await count(sessions, marks(group)) == 70
        assert sorted(e.id for e in run.seen) == sorted(e.id for e in before + during)  # exactly once
        async with sessions() as session:
            attempts = (await session.scalars(select(OutboxEvent.attempts))).all()
        assert set(attempts) == {0}  # an outage is not the events' fault


async def _write_outbox(sessions: async_sessionmaker[AsyncSession], events: list[Event]) -> None:
    async with sessions() as session, session.begin():
        await insert_events(session, events)


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def _positive(value: float) -> bool:
    return value > 0


async def test_an_event_too_large_for_the_broker_is_parked_and_the_rest_go_through(
    broker: Broker, sessions: async_sessionmaker[AsyncSession]
) -> None:
    group = unique_name("g")
    events = [usage_event("ten_a", i) for i in range(6)]
    huge = usage_event("ten_b", 99)
    huge.data["padding"] = "x" * (1536 * 1024)  # over the 1 MiB both brokers take by default
    async with running(broker, sessions, group) as run:
        await _write_outbox(sessions, [*events[:3], huge, *events[3:]])
        run.relay.poke()
        await eventually(lambda: _equals(count(sessions, usage_rows()), 6), timeout=60, what="6 delivered")
        await eventually(lambda: _equals(count(sessions, pending()), 0), timeout=60, what="nothing pending")
        async with sessions() as session:
            parked = await session.scalar(select(OutboxEvent).where(OutboxEvent.id == huge.id))
            dead = await session.scalar(
                select(OutboxEvent).where(OutboxEvent.topic == MODEL_USAGE + DEAD_LETTER_SUFFIX)
            )
        assert parked is not None and "EventTooLarge" in (parked.last_error or "")
        assert dead is not None and dead.data["event"]["id"] == huge.id
        assert dead.data["event"]["data"] == {"omitted_bytes": len(orjson.dumps(huge.data))}
        assert huge.id not in {e.id for e in run.seen}
