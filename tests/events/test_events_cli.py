"""`soma events tail|replay` through the real binary against a real database: envelopes printed one a
line; replay re-queues, and with `--group` that group applies the events again, idempotently."""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
from datetime import timedelta

import orjson
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.analytics.tables import UsageRecord
from somaagent.analytics.usage import store_usage
from somaagent.core.clock import utcnow
from somaagent.events.consumers import ConsumerSpec
from somaagent.events.inprocess import InProcessBus
from somaagent.events.outbox import audit
from somaagent.events.relay import OutboxRelay
from somaagent.events.schemas import AUDIT_EVENTS, MODEL_USAGE, Event
from somaagent.events.tables import OutboxEvent
from tests.events.sample_events import marks, new_runner, stage, usage_event
from tests.support.processes import SOMA


async def soma(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOMA_")}
    env.update({"SOMA_DATA_DIR": tempfile.mkdtemp(prefix="soma-cli-"), "SOMA_DATABASE_URL": database_url})
    return await asyncio.to_thread(
        subprocess.run, [SOMA, "events", *args], env=env, capture_output=True, text=True, timeout=60
    )


async def test_tail_prints_the_envelopes_of_a_topic_in_order(
    migrated_database: str, sessions: async_sessionmaker[AsyncSession]
) -> None:
    async with sessions() as session, session.begin():
        for n in range(3):
            audit(session, "user:u1", "ten_a", "user.updated", n=n)
    await stage(sessions, [usage_event("ten_a")])
    tailed = await soma(migrated_database, "tail", AUDIT_EVENTS, "--from-beginning", "--limit", "3")
    assert tailed.returncode == 0, tailed.stderr
    lines = [orjson.loads(line) for line in tailed.stdout.splitlines()]
    assert [line["data"]["n"] for line in lines] == [0, 1, 2]
    assert all(
        set(line) == {"id", "type", "version", "tenant_id", "occurred_at", "actor", "data"} for line in lines
    )
    assert {(line["type"], line["tenant_id"], line["actor"], line["version"]) for line in lines} == {
        ("user.updated", "ten_a", "user:u1", 1)
    }


async def test_bad_arguments_are_one_clear_line_and_exit_code_2(migrated_database: str) -> None:
    cases = [
        (("tail", "no.such.topic"), "unknown topic 'no.such.topic'"),
        (("replay", "--from", "yesterday"), "is not an RFC 3339 timestamp"),
        (("replay", "--from", "2026-01-01T00:00:00"), "has no time zone"),
        (("replay", "--from", "2026-01-02T00:00:00Z", "--to", "2026-01-01T00:00:00Z"), "is not after"),
        (("replay", "--from", "2026-01-01T00:00:00Z", "--topic", "nope"), "unknown topic 'nope'"),
    ]
    for args, message in cases:
        done = await soma(migrated_database, *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert message in done.stderr and "Traceback" not in done.stderr, done.stderr


async def test_replay_requeues_and_a_named_group_reapplies_idempotently(
    migrated_database: str, sessions: async_sessionmaker[AsyncSession]
) -> None:
    handed: list[str] = []

    async def usage(session: AsyncSession, events: list[Event]) -> None:
        handed.extend(e.id for e in events)
        await store_usage(session, events)

    runner, _ = new_runner(sessions)
    bus = InProcessBus(runner)
    bus.subscribe(ConsumerSpec("usage", (MODEL_USAGE,), usage))
    relay = OutboxRelay(sessions, bus)
    events = [usage_event("ten_a", prompt=i) for i in range(5)]
    before = utcnow() - timedelta(seconds=1)
    await stage(sessions, events)
    await stage(sessions, [Event(topic=AUDIT_EVENTS, type="x.y", tenant_id=None, actor=None, data={})])
    await relay.drain()
    assert handed == [e.id for e in events]

    queued = await soma(migrated_database, "replay", "--from", before.isoformat(), "--topic", MODEL_USAGE)
    assert queued.returncode == 0, queued.stderr
    assert queued.stdout.strip() == "queued 5 events for replay"
    assert await relay.drain() == 5  # republished, in order
    assert handed == [e.id for e in events]  # but the group had applied them: skipped

    again = await soma(migrated_database, "replay", "--from", before.isoformat(), "--group", "usage")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "queued 6 events for replay; group usage will apply them again"
    assert await relay.drain() == 6
    assert handed == [e.id for e in events] * 2  # handed again ...
    async with sessions() as session:  # ... and the ledger it keeps is unchanged
        assert await session.scalar(select(func.count()).select_from(UsageRecord)) == 5
        total = await session.scalar(select(func.sum(UsageRecord.prompt_tokens)))
        pending = await session.scalar(
            select(func.count()).select_from(OutboxEvent).where(OutboxEvent.published_at.is_(None))
        )
    assert total == sum(range(5)) and pending == 0
    assert await marks(sessions, "usage") == 5

    outside = await soma(migrated_database, "replay", "--from", utcnow().isoformat())
    assert outside.stdout.strip() == "queued 0 events for replay"
