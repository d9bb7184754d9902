"""What a consumer of the bus is: a named group, the topics it reads, and a handler.

A handler receives a batch of events of one topic inside a transaction the runner opened; it writes
with that session and never commits. The runner commits the handler's writes together with the
`processed_events` marks, so each event is applied once per group however often it is delivered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.events.schemas import Event


class Handler(Protocol):
    """Apply `events` (one topic, not yet seen by this group) through `session`; raise to refuse."""

    async def __call__(self, session: AsyncSession, events: Sequence[Event]) -> None: ...


@dataclass(frozen=True, slots=True)
class ConsumerSpec:
    """A durable consumer group: `group` names it on the broker and in `processed_events`."""

    group: str
    topics: tuple[str, ...]
    handle: Handler
