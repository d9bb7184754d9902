"""What a consumer of the bus is: a named group, the topics it reads, and a handler.

A handler receives a batch of events of one topic inside a transaction the runner opened; it writes
with that session and never commits. The runner commits the handler's writes together with the
`processed_events` marks, so each event is applied once per group however often it is delivered.

A handler whose writes are keyed by the event id (insert-or-skip on a unique key: the usage records,
the ledger, the audit log) is idempotent by itself, and says so with `idempotent_writes`: the runner
then keeps no marks for the events it applies, a row and an index entry fewer per event. Handlers that
add to totals (analytics) must not say so.
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
    """A durable consumer group: `group` names it on the broker and in `processed_events`
    (`idempotent_writes`: see the module's docstring; dead letters are marked either way, so each one
    is written once)."""

    group: str
    topics: tuple[str, ...]
    handle: Handler
    idempotent_writes: bool = False
