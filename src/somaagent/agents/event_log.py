"""A session's event log: numbered run events, durable ones in the database, live ones fanned out.

Every event of a session has a monotonic integer id (`seq`). State changes (`run.started`,
`memory.recalled`, `tool.call`, `tool.result`, `assistant.message`, `run.completed`, `run.failed`…)
are committed before they are published; `assistant.delta` pieces are published only (they are
summed up by the `assistant.message` that follows), and the process running the run keeps them in
memory until it ends so that a client reconnecting mid-run still gets them. A client that reconnects
later gets the durable events, which hold the whole conversation.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.agents.tables import AgentEvent, AgentSession

TERMINAL = frozenset({"run.completed", "run.failed"})
# Ids jump this far after a run that died with its process: live deltas it had streamed were never
# written, so their numbers must not be handed out again (a client may have seen them).
SEQ_GAP_AFTER_CRASH = 1 << 20
# How often a follower also looks at the database (for runs living in another process): every
# POLL_S while a run is active, backing off to IDLE_POLL_S on an idle session (a WebSocket left open).
POLL_S = 0.5
IDLE_POLL_S = 5.0


@dataclass(frozen=True, slots=True)
class RunEvent:
    """One event of a session's stream."""

    session_id: str
    seq: int
    type: str
    data: dict[str, Any]
    run_id: str | None
    created_at: datetime

    def wire(self) -> dict[str, Any]:
        """The JSON a client receives (SSE `data:`, WebSocket message, `GET …/events`)."""
        return {
            "id": self.seq,
            "type": self.type,
            "session_id": self.session_id,
            "run_id": self.run_id,
            "created_at": self.created_at.isoformat(),
            "data": self.data,
        }

    @classmethod
    def of(cls, row: AgentEvent) -> RunEvent:
        """From its stored row."""
        return cls(row.session_id, row.seq, row.type, row.data, row.run_id, row.created_at)


async def read_events(
    session: AsyncSession, tenant_id: str, session_id: str, after: int, limit: int = 1000
) -> list[RunEvent]:
    """Durable events of a session with seq > `after`, in order."""
    rows = (
        await session.scalars(
            select(AgentEvent)
            .where(
                AgentEvent.tenant_id == tenant_id,
                AgentEvent.session_id == session_id,
                AgentEvent.seq > after,
            )
            .order_by(AgentEvent.seq)
            .limit(limit)
        )
    ).all()
    return [RunEvent.of(row) for row in rows]


class LiveStreams:
    """This process's fan-out of run events per session, and the live deltas of its running runs."""

    def __init__(self) -> None:
        self._queues: dict[str, set[asyncio.Queue[RunEvent]]] = {}
        self._live: dict[str, list[RunEvent]] = {}

    def publish(self, event: RunEvent, *, durable: bool) -> None:
        """Hand `event` to every follower of its session (after it was committed, if durable)."""
        if not durable:
            self._live.setdefault(event.session_id, []).append(event)
        for queue in self._queues.get(event.session_id, ()):
            queue.put_nowait(event)

    def run_ended(self, session_id: str, run_id: str) -> None:
        """Forget the live deltas of a run (its durable events hold everything now); a run started
        on the session since keeps its own."""
        left = [e for e in self._live.get(session_id, ()) if e.run_id != run_id]
        if left:
            self._live[session_id] = left
        else:
            self._live.pop(session_id, None)

    def live_after(self, session_id: str, after: int) -> list[RunEvent]:
        """Deltas of the session's running run with seq > `after`."""
        return [e for e in self._live.get(session_id, ()) if e.seq > after]

    @contextlib.contextmanager
    def subscribe(self, session_id: str) -> Iterator[asyncio.Queue[RunEvent]]:
        """A queue receiving the session's events from now on."""
        queue: asyncio.Queue[RunEvent] = asyncio.Queue()
        self._queues.setdefault(session_id, set()).add(queue)
        try:
            yield queue
        finally:
            followers = self._queues.get(session_id)
            if followers is not None:
                followers.discard(queue)
                if not followers:
                    del self._queues[session_id]


async def follow_events(
    sessions: async_sessionmaker[AsyncSession],
    streams: LiveStreams,
    tenant_id: str,
    session_id: str,
    after: int,
    *,
    until_run: str | None = None,
    forever: bool = False,
) -> AsyncIterator[RunEvent]:
    """Replay the session's events after `after`, then follow live ones.

    Stops at the terminal event of `until_run`; without it, when no run is active (unless `forever`).
    Runs living in another process are followed by polling the database.
    """
    last = after
    interval = POLL_S
    live: list[RunEvent] | None = None  # None: look at the database this round
    with streams.subscribe(session_id) as queue:
        while True:
            if live is None:
                async with sessions() as db:
                    events = await read_events(db, tenant_id, session_id, last)
                    active = await db.scalar(
                        select(AgentSession.active_run_id).where(
                            AgentSession.tenant_id == tenant_id, AgentSession.id == session_id
                        )
                    )
                events += streams.live_after(session_id, last)
                events.sort(key=lambda e: e.seq)
                interval = POLL_S if active is not None or events else min(interval * 2, IDLE_POLL_S)
            else:
                events, interval = live, POLL_S
            for event in events:
                if event.seq <= last:
                    continue
                last = event.seq
                yield event
                if _ends(event, until_run):
                    return
            if live is None and until_run is None and active is None and not forever:
                return
            # The next live event, or after `interval` a look at the database.
            try:
                live = [await asyncio.wait_for(queue.get(), interval)]
            except TimeoutError:
                live = None


def _ends(event: RunEvent, until_run: str | None) -> bool:
    return event.type in TERMINAL and (until_run is None or event.run_id == until_run)
