"""Events and consumer groups the bus-core tests share: real handlers writing real tables."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.analytics.tables import UsageRecord
from somaagent.events.outbox import add_event
from somaagent.events.runner import ConsumerRunner
from somaagent.events.schemas import MODEL_USAGE, Event
from somaagent.events.tables import OutboxEvent, ProcessedEvent


def usage_event(
    tenant: str, model: str = "m1", prompt: int = 10, completion: int = 2, **extra: object
) -> Event:
    """A `model.usage` event as `api/metering.py` writes it."""
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
            **extra,
        },
    )


@dataclass
class StrictUsage:
    """A `model.usage` handler that inserts without skipping duplicates (a second application of an
    event would fail), remembers what it was handed, and refuses events whose model is "poison"."""

    handed: list[list[str]] = field(default_factory=list)

    async def __call__(self, session: AsyncSession, events: Sequence[Event]) -> None:
        self.handed.append([e.id for e in events])
        for event in events:
            if event.data["model"] == "poison":
                raise ValueError(f"cannot digest {event.id}")
        await session.execute(
            insert(UsageRecord),
            [
                {
                    "event_id": e.id,
                    "tenant_id": e.tenant_id,
                    "request_id": e.data["request_id"],
                    "key_id": None,
                    "model": e.data["model"],
                    "kind": "chat",
                    "prompt_tokens": e.data["prompt_tokens"],
                    "completion_tokens": e.data["completion_tokens"],
                    "latency_ms": e.data["latency_ms"],
                    "status": e.data["status"],
                    "occurred_at": e.occurred_at,
                    "day": e.occurred_at.date().isoformat(),
                }
                for e in events
            ],
        )

    def applied(self) -> list[str]:
        """Every event id handed over, in order (including batches that were then refused)."""
        return [i for batch in self.handed for i in batch]


@dataclass
class Pokes:
    """Counts `on_outbox` calls (the relay's poke)."""

    count: int = 0

    def __call__(self) -> None:
        self.count += 1


def new_runner(sessions: async_sessionmaker[AsyncSession], attempts: int = 3) -> tuple[ConsumerRunner, Pokes]:
    pokes = Pokes()
    return ConsumerRunner(sessions, attempts=attempts, on_outbox=pokes), pokes


async def stage(sessions: async_sessionmaker[AsyncSession], events: Sequence[Event]) -> None:
    """Commit `events` to the outbox, one row each, in order."""
    async with sessions() as session, session.begin():
        for event in events:
            add_event(session, event)


async def usage_ids(sessions: async_sessionmaker[AsyncSession]) -> list[str]:
    async with sessions() as session:
        return sorted((await session.scalars(select(UsageRecord.event_id))).all())


async def marks(sessions: async_sessionmaker[AsyncSession], group: str) -> int:
    async with sessions() as session:
        query = select(func.count()).select_from(ProcessedEvent).where(ProcessedEvent.group == group)
        return int(await session.scalar(query) or 0)


async def outbox_rows(sessions: async_sessionmaker[AsyncSession], topic: str) -> list[OutboxEvent]:
    async with sessions() as session:
        query = select(OutboxEvent).where(OutboxEvent.topic == topic).order_by(OutboxEvent.seq)
        return list((await session.scalars(query)).all())
