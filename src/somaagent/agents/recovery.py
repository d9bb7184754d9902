"""Recovering runs whose process died: found by their stale heartbeat, marked `interrupted`, their
session freed. Several processes may sweep at once; a conditional UPDATE lets exactly one win."""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.agents.event_log import SEQ_GAP_AFTER_CRASH
from somaagent.agents.tables import AgentEvent, AgentRun, AgentSession
from somaagent.core.clock import utcnow
from somaagent.events.outbox import add_event
from somaagent.events.schemas import CONVERSATION_EVENTS, Event
from somaagent.tools.tables import Approval

log = logging.getLogger(__name__)


async def stale_runs(sessions: async_sessionmaker[AsyncSession], stale_s: float) -> list[str]:
    """Runs still `running` whose heartbeat is older than `stale_s` seconds."""
    cutoff = utcnow() - timedelta(seconds=stale_s)
    async with sessions() as db:
        found = await db.scalars(
            select(AgentRun.id).where(AgentRun.status == "running", AgentRun.heartbeat_at < cutoff)
        )
        return list(found.all())


async def mark_interrupted(sessions: async_sessionmaker[AsyncSession], run_id: str, stale_s: float) -> bool:
    """End a stale run with `run.failed` / `interrupted`; False if it is alive after all.

    The event's id jumps `SEQ_GAP_AFTER_CRASH` past the session's last stored one: the dead process
    may have streamed deltas under ids it never stored."""
    cutoff = utcnow() - timedelta(seconds=stale_s)
    async with sessions() as db, db.begin():
        run = await db.scalar(select(AgentRun).where(AgentRun.id == run_id))
        if run is None:
            return True
        ended = await db.execute(
            update(AgentRun)
            .where(AgentRun.id == run_id, AgentRun.status == "running", AgentRun.heartbeat_at < cutoff)
            .values(status="failed", reason="interrupted", finished_at=utcnow())
        )
        if ended.rowcount == 0:  # type: ignore[attr-defined]
            return run.status != "running"
        session = await db.scalar(select(AgentSession).where(AgentSession.id == run.session_id))
        if session is None:
            return True
        seq = session.last_seq + SEQ_GAP_AFTER_CRASH
        db.add(
            AgentEvent(
                tenant_id=run.tenant_id,
                session_id=run.session_id,
                seq=seq,
                run_id=run_id,
                type="run.failed",
                data={
                    "reason": "interrupted",
                    "message": "the process running this run stopped",
                    "usage": {},
                    "steps": run.steps,
                },
                created_at=utcnow(),
            )
        )
        session.last_seq = seq
        if session.active_run_id == run_id:
            session.active_run_id = None
        # Its waiting tool calls will never run: nobody may approve them now.
        await db.execute(
            update(Approval)
            .where(
                Approval.run_id == run_id, Approval.tenant_id == run.tenant_id, Approval.status == "pending"
            )
            .values(
                status="cancelled", decided_by="system", note="the run was interrupted", decided_at=utcnow()
            )
        )
        add_event(
            db,
            Event(
                topic=CONVERSATION_EVENTS,
                type="run.failed",
                tenant_id=run.tenant_id,
                actor=None,
                data={
                    "session_id": run.session_id,
                    "run_id": run_id,
                    "status": "failed",
                    "reason": "interrupted",
                },
            ),
        )
    log.warning("run %s was interrupted (its process stopped); marked failed", run_id)
    return True
