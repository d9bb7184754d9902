"""The built-in tools and a run's tool context over a real session and run log, for tests of what wraps
a tool call."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.agents.event_log import LiveStreams
from somaagent.agents.recorder import RunRecorder
from somaagent.agents.tables import AgentSession
from somaagent.core.clock import utcnow
from somaagent.core.ids import new_id
from somaagent.core.principal import Principal
from somaagent.tools.builtins import builtin_tools, signing_key_from_secret
from somaagent.tools.manifest import trusted_keys_from
from somaagent.tools.registry import ToolContext, ToolRegistry, ToolStatus


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


async def _no_memory(_context: ToolContext, _query: str, _top_k: int) -> list[tuple[str, str, float]]:
    return []


def builtins() -> tuple[ToolRegistry, dict[str, ToolStatus]]:
    """A registry of the real built-in tools (memory search finds nothing), and each tool enabled."""
    key = signing_key_from_secret(b"tool call tests")
    registry = ToolRegistry(trusted_keys_from(key.public_key()))
    statuses = {}
    for tool in builtin_tools(key, _no_memory):
        registry.register(tool)
        statuses[tool.name] = ToolStatus(tool, True, {})
    return registry, statuses
