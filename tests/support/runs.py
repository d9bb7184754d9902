"""A run's tool context over a real session and run log, for tests of what wraps a tool call."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.agents.event_log import LiveStreams
from somaagent.agents.recorder import RunRecorder
from somaagent.agents.tables import AgentSession
from somaagent.core.clock import utcnow
from somaagent.core.ids import new_id
from somaagent.core.principal import Principal
from somaagent.tools.registry import ToolContext


async def run_context(
    sessions: async_sessionmaker[AsyncSession], principal: Principal
) -> tuple[ToolContext, RunRecorder]:
    """A context whose `record` writes into a real session's run log, as the agent loop's does."""
    session_id, run_id, now = new_id("ses"), new_id("run"), utcnow()
    async with sessions() as db, db.begin():
        db.add(
            AgentSession(
                id=session_id,
                tenant_id=principal.tenant_id,
                meta={},
                last_seq=0,
                active_run_id=run_id,
                created_at=now,
                updated_at=now,
            )
        )
    recorder = RunRecorder(sessions, LiveStreams(), principal.tenant_id, session_id, run_id, 1)

    async def record(type_: str, data: dict[str, Any]) -> None:
        await recorder.record(type_, data)

    context = ToolContext(principal, session_id, run_id, {}, call_id=new_id("call"), record=record)
    return context, recorder
