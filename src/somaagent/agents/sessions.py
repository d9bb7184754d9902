"""Sessions per tenant: create, get, list, delete, history, export and import."""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.agents.event_log import RunEvent, read_events
from somaagent.agents.recorder import message_row
from somaagent.agents.schemas import EventOut, ExportedMessage, SessionExport, SessionIn, ToolCallOut
from somaagent.agents.tables import AgentEvent, AgentMessage, AgentRun, AgentSession
from somaagent.core.clock import utcnow
from somaagent.core.errors import Conflict, NotFound
from somaagent.core.ids import new_id
from somaagent.core.principal import Principal
from somaagent.models.messages import Message, ToolCall

# History a run loads at most; older turns would be trimmed from the prompt anyway.
HISTORY_LIMIT = 400


async def create_session(session: AsyncSession, principal: Principal, body: SessionIn) -> AgentSession:
    """A new, empty session (the caller commits)."""
    now = utcnow()
    row = AgentSession(
        id=new_id("ses"),
        tenant_id=principal.tenant_id,
        persona=body.persona,
        model=body.model_profile,
        meta=dict(body.metadata),
        last_seq=0,
        active_run_id=None,
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    await session.flush()
    return row


async def get_session(session: AsyncSession, principal: Principal, session_id: str) -> AgentSession:
    """The tenant's session, or NotFound (another tenant's session does not exist for the caller)."""
    row = await session.scalar(
        select(AgentSession).where(
            AgentSession.id == session_id, AgentSession.tenant_id == principal.tenant_id
        )
    )
    if row is None:
        raise NotFound(f"no session {session_id!r}", param="session_id")
    return row


async def list_sessions(
    session: AsyncSession, principal: Principal, limit: int, after: str | None
) -> list[AgentSession]:
    """The tenant's sessions, newest first, `limit` at a time before the id `after`."""
    query = (
        select(AgentSession)
        .where(AgentSession.tenant_id == principal.tenant_id)
        .order_by(AgentSession.id.desc())
        .limit(limit)
    )
    if after is not None:
        query = query.where(AgentSession.id < after)
    return list((await session.scalars(query)).all())


async def delete_session(session: AsyncSession, principal: Principal, session_id: str) -> AgentSession:
    """Delete a session with its messages, runs and events; refused while a run is active."""
    row = await get_session(session, principal, session_id)
    if row.active_run_id is not None:
        raise Conflict(
            f"session {session_id!r} has an active run {row.active_run_id!r}; cancel it first "
            f"(POST /v1/sessions/{session_id}/runs/{row.active_run_id}/cancel)",
            param="session_id",
        )
    for table in (AgentMessage, AgentEvent, AgentRun):
        await session.execute(
            delete(table).where(table.tenant_id == principal.tenant_id, table.session_id == session_id)
        )
    await session.delete(row)
    await session.flush()
    return row


async def history_rows(
    session: AsyncSession, tenant_id: str, session_id: str, limit: int = HISTORY_LIMIT
) -> list[AgentMessage]:
    """The newest `limit` messages of the session, oldest first."""
    rows = (
        await session.scalars(
            select(AgentMessage)
            .where(AgentMessage.tenant_id == tenant_id, AgentMessage.session_id == session_id)
            .order_by(AgentMessage.seq.desc(), AgentMessage.id.desc())
            .limit(limit)
        )
    ).all()
    return list(reversed(rows))


async def run_answer(session: AsyncSession, tenant_id: str, run_id: str) -> str | None:
    """The final answer of a run (its last assistant message without tool calls)."""
    rows = (
        await session.scalars(
            select(AgentMessage)
            .where(
                AgentMessage.tenant_id == tenant_id,
                AgentMessage.run_id == run_id,
                AgentMessage.role == "assistant",
            )
            .order_by(AgentMessage.id.desc())
            .limit(1)
        )
    ).all()
    return rows[0].content if rows and not rows[0].tool_calls else None


def as_message(row: AgentMessage) -> Message:
    """A stored message in the one message protocol."""
    calls = tuple(ToolCall(c["id"], c["name"], c["arguments"]) for c in row.tool_calls or ())
    return Message(row.role, row.content, calls, row.tool_call_id, row.name)  # type: ignore[arg-type]


async def export_session(session: AsyncSession, principal: Principal, session_id: str) -> SessionExport:
    """The whole session as one JSON document."""
    row = await get_session(session, principal, session_id)
    messages = await history_rows(session, principal.tenant_id, session_id, limit=10_000)
    events: list[RunEvent] = []
    after = 0
    while True:
        page = await read_events(session, principal.tenant_id, session_id, after)
        events += page
        if len(page) < 1000:
            break
        after = page[-1].seq
    return SessionExport(
        persona=row.persona,
        model_profile=row.model,
        metadata=row.meta,
        messages=[
            ExportedMessage(
                role=m.role,
                content=m.content,
                tool_calls=[ToolCallOut(**c) for c in m.tool_calls] if m.tool_calls else None,
                tool_call_id=m.tool_call_id,
                name=m.name,
            )
            for m in messages
        ],
        events=[EventOut(**e.wire()) for e in events],
    )


async def import_session(session: AsyncSession, principal: Principal, body: SessionExport) -> AgentSession:
    """A new session holding the exported messages (its events start afresh; the caller commits)."""
    history = [
        Message(
            m.role,
            m.content,
            tuple(ToolCall(c.id, c.name, c.arguments) for c in m.tool_calls or ()),
            m.tool_call_id,
            m.name,
        )
        for m in body.messages
    ]
    spec = SessionIn(persona=body.persona, model_profile=body.model_profile, metadata=body.metadata)
    return await create_session_with_history(session, principal, spec, history)


async def create_session_with_history(
    session: AsyncSession, principal: Principal, body: SessionIn, history: list[Message]
) -> AgentSession:
    """A new session whose history is `history` (the caller commits)."""
    row = await create_session(session, principal, body)
    for seq, message in enumerate(history, start=1):
        session.add(message_row(principal.tenant_id, row.id, None, seq, message))
    # History takes seq numbers so it keeps its order; the event log starts after them.
    row.last_seq = len(history)
    await session.flush()
    return row
