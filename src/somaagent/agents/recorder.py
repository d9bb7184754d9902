"""Writing one run's events: numbered, committed (with the messages and outbox events they imply)
before they are published, so a crash never loses what a client was told."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.agents.event_log import LiveStreams, RunEvent
from somaagent.agents.tables import AgentEvent, AgentMessage, AgentRun, AgentSession
from somaagent.core.clock import utcnow
from somaagent.events.outbox import add_event
from somaagent.events.schemas import Event
from somaagent.models.messages import Message


@dataclass
class Pending:
    """What one durable event brings with it, all committed in the same transaction."""

    messages: list[Message] = field(default_factory=list)
    outbox: list[Event] = field(default_factory=list)
    run: dict[str, Any] = field(default_factory=dict)  # column → value on the run row
    release_session: bool = False  # clear the session's active run (the run is over)


class RunRecorder:
    """Appends a run's events to its session's log. The run owns the session's numbering while it is
    active (one run per session at a time), so ids are handed out here without a round trip."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        streams: LiveStreams,
        tenant_id: str,
        session_id: str,
        run_id: str,
        next_seq: int,
        on_committed: Any = None,
    ) -> None:
        self._sessions = sessions
        self._streams = streams
        self.tenant_id = tenant_id
        self.session_id = session_id
        self.run_id = run_id
        self._next = next_seq
        self._on_committed = on_committed

    def db(self) -> AsyncSession:
        """A new database session (for reads a node makes)."""
        return self._sessions()

    def _take(self) -> int:
        seq = self._next
        self._next += 1
        return seq

    def live(self, type_: str, data: dict[str, Any]) -> RunEvent:
        """Publish a transient event (a delta): numbered, streamed, not stored."""
        event = RunEvent(self.session_id, self._take(), type_, data, self.run_id, utcnow())
        self._streams.publish(event, durable=False)
        return event

    async def record(self, type_: str, data: dict[str, Any], pending: Pending | None = None) -> RunEvent:
        """Commit a durable event (and what it brings), then publish it."""
        events = await self.record_many([(type_, data)], pending)
        return events[0]

    async def record_many(
        self, items: Sequence[tuple[str, dict[str, Any]]], pending: Pending | None = None
    ) -> list[RunEvent]:
        """Commit several durable events in one transaction, then publish them in order."""
        pending = pending or Pending()
        now = utcnow()
        events = [RunEvent(self.session_id, self._take(), t, d, self.run_id, now) for t, d in items]
        async with self._sessions() as db, db.begin():
            for event in events:
                db.add(
                    AgentEvent(
                        tenant_id=self.tenant_id,
                        session_id=self.session_id,
                        seq=event.seq,
                        run_id=self.run_id,
                        type=event.type,
                        data=event.data,
                        created_at=now,
                    )
                )
            for message in pending.messages:
                db.add(message_row(self.tenant_id, self.session_id, self.run_id, events[0].seq, message))
            for outbox_event in pending.outbox:
                add_event(db, outbox_event)
            await write_session_state(db, self.tenant_id, self.session_id, events[-1].seq, pending)
            if pending.run:
                await db.execute(
                    update(AgentRun)
                    .where(AgentRun.id == self.run_id, AgentRun.tenant_id == self.tenant_id)
                    .values(**pending.run)
                )
        for event in events:
            self._streams.publish(event, durable=True)
        if pending.outbox and self._on_committed is not None:
            self._on_committed()
        return events


async def write_session_state(
    db: AsyncSession, tenant_id: str, session_id: str, last_seq: int, pending: Pending
) -> None:
    """Advance the session's numbering (and free it when its run is over)."""
    values: dict[str, Any] = {"last_seq": last_seq, "updated_at": utcnow()}
    if pending.release_session:
        values["active_run_id"] = None
    await db.execute(
        update(AgentSession)
        .where(AgentSession.id == session_id, AgentSession.tenant_id == tenant_id)
        .values(**values)
    )


def message_row(
    tenant_id: str, session_id: str, run_id: str | None, seq: int, message: Message
) -> AgentMessage:
    """A conversation message as stored."""
    return AgentMessage(
        tenant_id=tenant_id,
        session_id=session_id,
        seq=seq,
        run_id=run_id,
        role=message.role,
        content=message.content,
        tool_calls=[{"id": c.id, "name": c.name, "arguments": c.arguments} for c in message.tool_calls]
        or None,
        tool_call_id=message.tool_call_id,
        name=message.name,
        created_at=utcnow(),
    )
