"""`soma events tail|replay`: watch a topic, and re-queue outbox events for the relay to publish again.

Owns: the operator commands of the event bus. May import: config, db, events, api.event_bus (to build
the configured adapter). Never: a domain package.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated

import orjson
import typer
from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.config import Settings
from somaagent.db import migrate
from somaagent.db.engine import create_engine, session_factory
from somaagent.events import schemas
from somaagent.events.relay import event_of
from somaagent.events.schemas import DEAD_LETTER_SUFFIX, Event
from somaagent.events.tables import OutboxEvent, ProcessedEvent

events = typer.Typer(help="Operate the event bus: tail a topic, replay events.", no_args_is_help=True)

TOPICS = (
    schemas.MODEL_USAGE,
    schemas.AUDIT_EVENTS,
    schemas.CONVERSATION_EVENTS,
    schemas.TOOL_CALLS,
    schemas.CONSTITUTION_UPDATED,
    schemas.POLICY_DECISIONS,
    schemas.NOTIFICATIONS_OUTBOUND,
    schemas.WORKFLOW_EVENTS,
    schemas.SETTINGS_CHANGED,
)
_POLL_S = 0.5  # how often `tail` on the in-process bus looks for new outbox rows
_IDS_PER_STATEMENT = 500


class UsageError(Exception):
    """A bad argument: printed as one line, exit code 2."""


def _check_topic(topic: str) -> str:
    base = topic.removesuffix(DEAD_LETTER_SUFFIX)
    if base not in TOPICS:
        known = ", ".join(TOPICS)
        raise UsageError(f"unknown topic {topic!r}; topics are {known} (and each with {DEAD_LETTER_SUFFIX})")
    return topic


def _parse_time(value: str, option: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(
            f"{option} {value!r} is not an RFC 3339 timestamp; write e.g. 2026-12-02T19:00:00Z"
        ) from None
    if parsed.tzinfo is None:
        raise UsageError(f"{option} {value!r} has no time zone; add Z or an offset like +02:00")
    return parsed


def _fail(exc: UsageError) -> typer.Exit:
    print(f"error: {exc}", file=sys.stderr)
    return typer.Exit(code=2)


@events.command("tail")
def tail(
    topic: Annotated[str, typer.Argument(help="The topic, e.g. model.usage or model.usage.dlq.")],
    from_beginning: Annotated[
        bool, typer.Option("--from-beginning", help="Start with the events already there.")
    ] = False,
    limit: Annotated[int | None, typer.Option(min=1, help="Stop after this many events.")] = None,
) -> None:
    """Print the events of TOPIC as JSON envelopes, one a line, as they arrive (from the broker for kafka
    and nats, from the outbox for the in-process bus). Tailing moves no consumer group."""
    try:
        _check_topic(topic)
    except UsageError as exc:
        raise _fail(exc) from None
    settings = Settings()
    migrate.upgrade(settings.resolved_database_url)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a follow ends
        asyncio.run(_tail(settings, topic, from_beginning, limit))


async def _tail(settings: Settings, topic: str, from_beginning: bool, limit: int | None) -> None:
    engine = create_engine(settings.resolved_database_url)
    sessions = session_factory(engine)
    try:
        if settings.event_bus == "inprocess":
            source = _tail_outbox(sessions, topic, from_beginning)
            await _print(source, limit)
            return
        from somaagent.api.event_bus import build_bus

        bus = build_bus(settings, sessions)
        await bus.start()
        try:
            await _print(bus.tail(topic, from_beginning=from_beginning, limit=limit), limit)
        finally:
            await bus.close()
    finally:
        await engine.dispose()


async def _print(source: AsyncIterator[Event], limit: int | None) -> None:
    printed = 0
    async for event in source:
        sys.stdout.write(orjson.dumps(event.to_json()).decode() + "\n")
        sys.stdout.flush()
        printed += 1
        if limit is not None and printed >= limit:
            return


async def _tail_outbox(
    sessions: async_sessionmaker[AsyncSession], topic: str, from_beginning: bool
) -> AsyncIterator[Event]:
    """The outbox rows of `topic` in `seq` order, then the new ones as they are written."""
    after = 0
    if not from_beginning:
        async with sessions() as session:
            after = int(await session.scalar(select(func.coalesce(func.max(OutboxEvent.seq), 0))) or 0)
    while True:
        async with sessions() as session:
            rows = (
                await session.scalars(
                    select(OutboxEvent)
                    .where(OutboxEvent.topic == topic, OutboxEvent.seq > after)
                    .order_by(OutboxEvent.seq)
                    .limit(500)
                )
            ).all()
        for row in rows:
            after = row.seq
            yield event_of(row)
        if not rows:
            await asyncio.sleep(_POLL_S)


@events.command("replay")
def replay(
    since: Annotated[str, typer.Option("--from", help="RFC 3339 time: replay events that occurred since.")],
    until: Annotated[
        str | None, typer.Option("--to", help="RFC 3339 time: and before this (default: now).")
    ] = None,
    topic: Annotated[str | None, typer.Option(help="Only this topic.")] = None,
    group: Annotated[
        str | None,
        typer.Option(help="Make this consumer group apply the events again (its marks are deleted)."),
    ] = None,
) -> None:
    """Mark the outbox events in the range unpublished again: the relay of a running server republishes
    them, and consumer groups skip those they already applied, unless named with --group."""
    try:
        start = _parse_time(since, "--from")
        end = _parse_time(until, "--to") if until is not None else None
        if end is not None and end <= start:
            raise UsageError(f"--to {until!r} is not after --from {since!r}")
        if topic is not None:
            _check_topic(topic)
    except UsageError as exc:
        raise _fail(exc) from None
    settings = Settings()
    migrate.upgrade(settings.resolved_database_url)
    count = asyncio.run(_replay(settings, start, end, topic, group))
    who = f"; group {group} will apply them again" if group else ""
    print(f"queued {count} events for replay{who}")


async def _replay(
    settings: Settings, start: datetime, end: datetime | None, topic: str | None, group: str | None
) -> int:
    engine = create_engine(settings.resolved_database_url)
    try:
        async with session_factory(engine)() as session, session.begin():
            return await requeue(session, start, end, topic, group)
    finally:
        await engine.dispose()


async def requeue(
    session: AsyncSession, start: datetime, end: datetime | None, topic: str | None, group: str | None
) -> int:
    """Mark outbox rows that occurred in [start, end) (of `topic`) pending again, first forgetting that
    `group` processed them; returns how many were queued."""
    query = select(OutboxEvent.seq, OutboxEvent.id).where(OutboxEvent.occurred_at >= start)
    if end is not None:
        query = query.where(OutboxEvent.occurred_at < end)
    if topic is not None:
        query = query.where(OutboxEvent.topic == topic)
    rows = (await session.execute(query)).all()
    for first in range(0, len(rows), _IDS_PER_STATEMENT):
        chunk = rows[first : first + _IDS_PER_STATEMENT]
        if group is not None:
            await session.execute(
                delete(ProcessedEvent).where(
                    ProcessedEvent.group == group, ProcessedEvent.event_id.in_([r.id for r in chunk])
                )
            )
        await session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.seq.in_([r.seq for r in chunk]))
            .values(published_at=None, attempts=0, last_error=None)
        )
    return len(rows)
