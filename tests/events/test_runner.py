"""The consumer runner on a real database: each event applied once per group however often it is
delivered (also concurrently), bad events dead-lettered on `<topic>.dlq` with the error, the loop going on."""

from __future__ import annotations

import asyncio
import base64
from collections import Counter
from collections.abc import Sequence

import orjson
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.analytics.usage import store_usage
from somaagent.events.catalog import DEAD_LETTERED
from somaagent.events.consumers import ConsumerSpec
from somaagent.events.notices import notification_event
from somaagent.events.outbox import add_event
from somaagent.events.schemas import MODEL_USAGE, NOTIFICATIONS_OUTBOUND, Event
from somaagent.events.wire import encode_event
from tests.events.sample_events import StrictUsage, marks, new_runner, outbox_rows, usage_event, usage_ids

DLQ = MODEL_USAGE + ".dlq"


async def test_the_same_events_delivered_three_times_apply_once(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    runner, pokes = new_runner(sessions)
    handler = StrictUsage()
    spec = ConsumerSpec("strict", (MODEL_USAGE,), handler)
    events = [usage_event("ten_a"), usage_event("ten_a"), usage_event("ten_b")]
    for _ in range(3):
        await runner.handle_events(spec, MODEL_USAGE, events)
    await runner.handle_events(spec, MODEL_USAGE, [events[1], events[1]])  # a batch repeating itself
    assert handler.handed == [[e.id for e in events]]  # one transaction for the batch, never again
    assert await usage_ids(sessions) == sorted(e.id for e in events)
    assert await marks(sessions, "strict") == 3
    assert await outbox_rows(sessions, DLQ) == []
    assert pokes.count == 1


async def test_a_group_with_idempotent_writes_keeps_no_marks_and_still_applies_once(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    runner, _ = new_runner(sessions)
    handed: list[str] = []

    async def usage(session: AsyncSession, events: Sequence[Event]) -> None:
        handed.extend(e.id for e in events)
        await store_usage(session, events)  # insert-or-skip by the event id

    spec = ConsumerSpec("keyed", (MODEL_USAGE,), usage, idempotent_writes=True)
    events = [usage_event("ten_a"), usage_event("ten_b")]
    poison = usage_event("ten_a")
    poison.data["prompt_tokens"] = -1  # refused by the schema
    for _ in range(3):
        await asyncio.gather(*(runner.handle_events(spec, MODEL_USAGE, [*events, poison]) for _ in range(2)))
    assert Counter(handed) == {e.id: 6 for e in events}  # handed every delivery ...
    assert await usage_ids(sessions) == sorted(e.id for e in events)  # ... applied once
    assert await marks(sessions, "keyed") == 1  # only the dead letter's
    assert [r.data["event"]["id"] for r in await outbox_rows(sessions, DLQ)] == [poison.id]


async def test_two_concurrent_deliveries_apply_each_event_once(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    runner, _ = new_runner(sessions)
    handler = StrictUsage()
    spec = ConsumerSpec("strict", (MODEL_USAGE,), handler)
    events = [usage_event(f"ten_{i % 3}") for i in range(200)]
    # Overlapping batches from two deliveries at once (a broker redelivering while the first is applied).
    await asyncio.gather(
        runner.handle_events(spec, MODEL_USAGE, events),
        runner.handle_events(spec, MODEL_USAGE, events[50:] + events[:50]),
        runner.handle_events(spec, MODEL_USAGE, events[100:]),
    )
    assert sorted(handler.applied()) == sorted(e.id for e in events)  # nobody was handed one twice
    assert await usage_ids(sessions) == sorted(e.id for e in events)
    assert await marks(sessions, "strict") == 200
    assert await outbox_rows(sessions, DLQ) == []


async def test_two_groups_each_apply_the_events_once(sessions: async_sessionmaker[AsyncSession]) -> None:
    runner, _ = new_runner(sessions)
    first, second = StrictUsage(), StrictUsage()
    events = [usage_event("ten_a") for _ in range(3)]
    await runner.handle_events(ConsumerSpec("first", (MODEL_USAGE,), first), MODEL_USAGE, events)
    # `second` writes nothing the first did not (it only records what it is handed): a separate table is
    # not needed to show the marks are per group.
    second_spec = ConsumerSpec("second", (MODEL_USAGE,), _recording(second))
    await runner.handle_events(second_spec, MODEL_USAGE, events)
    await runner.handle_events(second_spec, MODEL_USAGE, events)
    assert first.applied() == second.applied() == [e.id for e in events]
    assert await marks(sessions, "first") == await marks(sessions, "second") == 3


def _recording(handler: StrictUsage) -> object:
    async def record(session: AsyncSession, events: list[Event]) -> None:
        handler.handed.append([e.id for e in events])

    return record


async def test_unknown_version_and_invalid_body_are_dead_lettered_and_the_rest_applied(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    runner, pokes = new_runner(sessions)
    handler = StrictUsage()
    spec = ConsumerSpec("strict", (MODEL_USAGE,), handler)
    good = usage_event("ten_a")
    future = Event(**{**_fields(usage_event("ten_a")), "version": 2})
    mistyped = usage_event("ten_b", prompt="ten")  # type: ignore[arg-type]
    batch = [future, good, mistyped]
    await runner.handle_events(spec, MODEL_USAGE, batch)
    await runner.handle_events(spec, MODEL_USAGE, batch)  # redelivered: no second dead letter
    assert handler.applied() == [good.id]
    assert await usage_ids(sessions) == [good.id]
    assert await marks(sessions, "strict") == 3
    dead = await outbox_rows(sessions, DLQ)
    assert [d.type for d in dead] == [DEAD_LETTERED, DEAD_LETTERED]
    by_event = {d.data["event"]["id"]: d for d in dead}
    assert set(by_event) == {future.id, mistyped.id}
    assert "unknown version 2 of model.usage" in by_event[future.id].data["error"]
    assert "known: 1" in by_event[future.id].data["error"]
    assert "prompt_tokens" in by_event[mistyped.id].data["error"]
    assert by_event[mistyped.id].data["event"] == mistyped.to_json()
    assert {d.data["group"] for d in dead} == {"strict"} and {d.data["topic"] for d in dead} == {MODEL_USAGE}
    assert {d.tenant_id for d in dead} == {"ten_a", "ten_b"}
    assert all(d.published_at is None for d in dead)  # the relay publishes them like any event
    assert pokes.count == 1


def _fields(event: Event) -> dict[str, object]:
    return {
        "topic": event.topic,
        "type": event.type,
        "tenant_id": event.tenant_id,
        "actor": event.actor,
        "data": event.data,
        "id": event.id,
        "occurred_at": event.occurred_at,
        "version": event.version,
    }


async def test_undecodable_payloads_are_dead_lettered_with_their_bytes(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    runner, _ = new_runner(sessions)
    handler = StrictUsage()
    spec = ConsumerSpec("strict", (MODEL_USAGE,), handler)
    good = usage_event("ten_a")
    garbage = b"\xff not json"
    no_id = b'{"type": "model.usage", "version": 1, "occurred_at": "2026-01-01T00:00:00+00:00", "data": {}}'
    # An id no table can hold: refused as invalid, so its dead letter (which keeps the bytes) can be
    # recorded, rather than failing every insert and stalling the partition.
    long_id = orjson.dumps(usage_event("ten_a").to_json() | {"id": "evt_" + "x" * 40})
    for _ in range(2):
        await runner.handle_payloads(spec, MODEL_USAGE, [garbage, encode_event(good), no_id, long_id])
    assert handler.applied() == [good.id]
    dead = await outbox_rows(sessions, DLQ)
    assert sorted(base64.b64decode(d.data["payload_b64"]) for d in dead) == sorted([garbage, no_id, long_id])
    assert all(d.data["error"].startswith("envelope invalid") for d in dead)
    assert all(d.tenant_id is None for d in dead)


async def test_a_poison_event_is_dead_lettered_after_its_attempts_and_the_good_ones_applied(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    runner, pokes = new_runner(sessions, attempts=3)
    handler = StrictUsage()
    spec = ConsumerSpec("strict", (MODEL_USAGE,), handler)
    first, poison, last = usage_event("ten_a"), usage_event("ten_a", model="poison"), usage_event("ten_a")
    await runner.handle_events(spec, MODEL_USAGE, [first, poison, last])
    # The batch once, then one by one: the poison three times, the others once each.
    assert handler.handed == [
        [first.id, poison.id, last.id],
        [first.id],
        [poison.id],
        [poison.id],
        [poison.id],
        [last.id],
    ]
    assert await usage_ids(sessions) == sorted([first.id, last.id])
    dead = await outbox_rows(sessions, DLQ)
    assert len(dead) == 1
    assert dead[0].data["event"]["id"] == poison.id
    assert "cannot digest" in dead[0].data["error"] and "handler failed" in dead[0].data["error"]
    # Dead-lettered means processed: a redelivery neither retries it nor writes a second dead letter.
    await runner.handle_events(spec, MODEL_USAGE, [poison])
    assert len(handler.handed) == 6
    assert len(await outbox_rows(sessions, DLQ)) == 1
    assert await marks(sessions, "strict") == 3
    assert pokes.count >= 1


async def test_a_handler_stages_events_in_the_same_transaction(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    runner, pokes = new_runner(sessions)

    async def notify_on_usage(session: AsyncSession, events: list[Event]) -> None:
        for event in events:
            add_event(
                session,
                notification_event(
                    event.tenant_id or "",
                    kind="usage.seen",
                    severity="info",
                    message="seen",
                    dedupe_key=event.id,
                ),
            )

    spec = ConsumerSpec("notifier", (MODEL_USAGE,), notify_on_usage)
    events = [usage_event("ten_a"), usage_event("ten_a")]
    await runner.handle_events(spec, MODEL_USAGE, events)
    await runner.handle_events(spec, MODEL_USAGE, events)
    staged = await outbox_rows(sessions, NOTIFICATIONS_OUTBOUND)
    assert len(staged) == 2  # once per event, not once per delivery
    assert pokes.count == 1
