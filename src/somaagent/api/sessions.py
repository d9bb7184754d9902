"""`/v1/sessions`: sessions, messages that start runs (streamed as SSE), events (replay), WebSocket,
cancel, history, export and import — all scoped to the caller's tenant."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Query, Request, WebSocket, WebSocketDisconnect
from pydantic import ValidationError
from starlette.responses import Response, StreamingResponse

from somaagent.agents import sessions as agent_sessions
from somaagent.agents.event_log import RunEvent, follow_events, read_events
from somaagent.agents.personas import get_persona
from somaagent.agents.schemas import (
    EventListOut,
    EventOut,
    HistoryMessageOut,
    HistoryOut,
    MessageIn,
    RunOut,
    SessionExport,
    SessionIn,
    SessionListOut,
    SessionOut,
)
from somaagent.api.deps import ChatUseDep, InferenceDep, ServicesDep, SessionDep
from somaagent.api.errors import error_body, status_for, translate_validation
from somaagent.api.openai.docs import error_responses
from somaagent.api.services import Services
from somaagent.core.errors import Forbidden, InvalidRequest, SomaError
from somaagent.core.principal import Principal
from somaagent.identity.capabilities import Capability

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/sessions", tags=["Agents"])
LastEventId = Annotated[str | None, Header(alias="last-event-id", description="Resume after this event id.")]
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


@router.post("", response_model=SessionOut, status_code=201, responses=error_responses(400, 401, 404))
async def create_session(
    body: SessionIn, principal: ChatUseDep, services: ServicesDep, session: SessionDep
) -> SessionOut:
    if body.persona is not None:
        await get_persona(session, principal, body.persona)
    if body.model_profile is not None:
        await services.router.candidates(principal, body.model_profile)
    row = await agent_sessions.create_session(session, principal, body)
    await session.commit()
    return SessionOut.of(row)


@router.get("", response_model=SessionListOut, responses=error_responses(400, 401))
async def list_sessions(
    principal: ChatUseDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(description="Sessions older than this id (paging).")] = None,
) -> SessionListOut:
    rows = await agent_sessions.list_sessions(session, principal, limit + 1, after)
    return SessionListOut(data=[SessionOut.of(r) for r in rows[:limit]], has_more=len(rows) > limit)


@router.post("/import", response_model=SessionOut, status_code=201, responses=error_responses(400, 401))
async def import_session(body: SessionExport, principal: ChatUseDep, session: SessionDep) -> SessionOut:
    """A new session from an export (its messages become the history the agent sees)."""
    row = await agent_sessions.import_session(session, principal, body)
    await session.commit()
    return SessionOut.of(row)


@router.get("/{session_id}", response_model=SessionOut, responses=error_responses(401, 404))
async def get_session(session_id: str, principal: ChatUseDep, session: SessionDep) -> SessionOut:
    return SessionOut.of(await agent_sessions.get_session(session, principal, session_id))


@router.delete("/{session_id}", response_model=SessionOut, responses=error_responses(401, 404, 409))
async def delete_session(session_id: str, principal: ChatUseDep, session: SessionDep) -> SessionOut:
    row = await agent_sessions.delete_session(session, principal, session_id)
    await session.commit()
    return SessionOut.of(row)


@router.get("/{session_id}/history", response_model=HistoryOut, responses=error_responses(401, 404))
async def get_history(session_id: str, principal: ChatUseDep, session: SessionDep) -> HistoryOut:
    """The conversation as the agent sees it: user, assistant (with tool calls) and tool messages."""
    await agent_sessions.get_session(session, principal, session_id)
    rows = await agent_sessions.history_rows(session, principal.tenant_id, session_id, limit=10_000)
    return HistoryOut(data=[HistoryMessageOut.of(r) for r in rows])


@router.get("/{session_id}/export", response_model=SessionExport, responses=error_responses(401, 404))
async def export_session(session_id: str, principal: ChatUseDep, session: SessionDep) -> SessionExport:
    return await agent_sessions.export_session(session, principal, session_id)


@router.post(
    "/{session_id}/messages",
    status_code=200,
    responses={
        **error_responses(400, 401, 404, 409, 423),
        200: {
            "model": RunOut,
            "description": "An SSE stream of run events (`stream: true`, the default), or the finished run.",
            "content": {"text/event-stream": {}},
        },
    },
)
async def post_message(
    session_id: str, body: MessageIn, principal: InferenceDep, services: ServicesDep
) -> Response:
    """Start a run with this message; its events stream as SSE until `run.completed` / `run.failed`."""
    engine = services.agents
    started = await engine.start_run(principal, session_id, body)
    run_id = started.run_id
    if not body.stream:
        await engine.wait(run_id)
        return await _run_response(services, principal, session_id, run_id)
    events = follow_events(
        services.sessions, engine.streams, principal.tenant_id, session_id, started.after, until_run=run_id
    )
    return StreamingResponse(_sse(events), media_type="text/event-stream", headers=_SSE_HEADERS)


@router.get(
    "/{session_id}/events",
    responses={
        **error_responses(400, 401, 404),
        200: {
            "model": EventListOut,
            "description": "JSON list of stored events; with `Accept: text/event-stream`, an SSE replay that "
            "follows the active run to its end.",
            "content": {"text/event-stream": {}},
        },
    },
)
async def get_events(
    session_id: str,
    request: Request,
    principal: ChatUseDep,
    services: ServicesDep,
    last_event_id: LastEventId = None,
    after: Annotated[int | None, Query(ge=0, description="Events with an id above this.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="JSON: events per page.")] = 1000,
) -> Response:
    """Replay what was missed: events after `after` (or the `Last-Event-ID` header)."""
    start = after if after is not None else _parse_last_event_id(last_event_id)
    async with services.sessions() as db:
        await agent_sessions.get_session(db, principal, session_id)
        if "text/event-stream" not in request.headers.get("accept", ""):
            stored = await read_events(db, principal.tenant_id, session_id, start, limit + 1)
            page = EventListOut(
                data=[EventOut(**e.wire()) for e in stored[:limit]], has_more=len(stored) > limit
            )
            return Response(page.model_dump_json(), media_type="application/json")
    events = follow_events(services.sessions, services.agents.streams, principal.tenant_id, session_id, start)
    return StreamingResponse(_sse(events), media_type="text/event-stream", headers=_SSE_HEADERS)


@router.get("/{session_id}/runs/{run_id}", response_model=RunOut, responses=error_responses(401, 404))
async def get_run(session_id: str, run_id: str, principal: ChatUseDep, services: ServicesDep) -> Response:
    return await _run_response(services, principal, session_id, run_id)


@router.post("/{session_id}/runs/{run_id}/cancel", response_model=RunOut, responses=error_responses(401, 404))
async def cancel_run(session_id: str, run_id: str, principal: ChatUseDep, services: ServicesDep) -> Response:
    """Stop a run; answers the run once it has ended (a finished run is returned as it is)."""
    await services.agents.cancel(principal, session_id, run_id)
    return await _run_response(services, principal, session_id, run_id)


@router.websocket("/{session_id}/ws")
async def session_socket(websocket: WebSocket, session_id: str, after: int | None = None) -> None:
    """The session's events as JSON messages; send `{"type": "message", ...}` to start a run and
    `{"type": "cancel", "run_id": ...}` to stop one. Authenticate with the `Authorization` header."""
    services: Services = websocket.app.state.services
    try:
        principal = await services.authenticator.authenticate(websocket.headers.get("authorization"))
        if not principal.can(Capability.CHAT_USE):
            raise Forbidden("this needs the `chat:use` capability", code="missing_capability")
        async with services.sessions() as db:
            row = await agent_sessions.get_session(db, principal, session_id)
    except SomaError as exc:
        status, _ = status_for(exc)
        await websocket.close(code=4000 + status, reason=exc.message[:120])
        return
    await websocket.accept()
    start = row.last_seq if after is None else after
    events = follow_events(
        services.sessions, services.agents.streams, principal.tenant_id, session_id, start, forever=True
    )

    async def send_events() -> None:
        async for event in events:
            await websocket.send_text(orjson.dumps(event.wire()).decode())

    sender = asyncio.create_task(send_events())
    try:
        while True:
            command = await websocket.receive_json()
            try:
                # Each command re-checks the credential (cached, cheap): a logout, revocation or expiry
                # must stop a socket opened before it.
                principal = await services.authenticator.authenticate(websocket.headers.get("authorization"))
            except SomaError as exc:
                await websocket.close(code=4401, reason=exc.message[:120])
                return
            await _socket_command(websocket, services, principal, session_id, command)
    except WebSocketDisconnect:
        pass
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sender


async def _socket_command(
    websocket: WebSocket, services: Services, principal: Principal, session_id: str, command: Any
) -> None:
    try:
        if not isinstance(command, dict) or command.get("type") not in ("message", "cancel"):
            raise InvalidRequest(
                'send {"type": "message", "content": ...} or {"type": "cancel", "run_id": ...}'
            )
        if command["type"] == "cancel":
            await services.agents.cancel(principal, session_id, str(command.get("run_id", "")))
            return
        fields = {k: v for k, v in command.items() if k != "type"}
        try:
            body = MessageIn(**fields)
        except ValidationError as exc:
            raise translate_validation([dict(e) for e in exc.errors()]) from None
        await services.training.admit_inference(principal)
        started = await services.agents.start_run(principal, session_id, body)
        accepted = {"type": "run.accepted", "run_id": started.run_id}
        await websocket.send_text(orjson.dumps(accepted).decode())
    except SomaError as exc:
        _, type_ = status_for(exc)
        await websocket.send_text(
            orjson.dumps({"type": "error", **error_body(exc.message, type_, exc.code, exc.param)}).decode()
        )


async def _run_response(services: Services, principal: Principal, session_id: str, run_id: str) -> Response:
    row = await services.agents.get_run(principal, session_id, run_id)
    answer = None
    if row.status == "completed":
        async with services.sessions() as db:
            answer = await agent_sessions.run_answer(db, principal.tenant_id, run_id)
    return Response(RunOut.of(row, answer).model_dump_json(), media_type="application/json")


async def _sse(events: AsyncIterator[RunEvent]) -> AsyncIterator[bytes]:
    try:
        async for event in events:
            yield b"id: %d\nevent: %s\ndata: %s\n\n" % (
                event.seq,
                event.type.encode(),
                orjson.dumps(event.wire()),
            )
    except SomaError as exc:
        _, type_ = status_for(exc)
        yield b"event: error\ndata: %s\n\n" % orjson.dumps(
            error_body(exc.message, type_, exc.code, exc.param)
        )
    except Exception:
        log.exception("event stream failed")
        yield b"event: error\ndata: %s\n\n" % orjson.dumps(
            error_body(
                "the event stream failed; reconnect with Last-Event-ID", "server_error", "internal_error"
            )
        )


def _parse_last_event_id(value: str | None) -> int:
    if value is None or not value.strip():
        return 0
    try:
        return max(0, int(value.strip()))
    except ValueError:
        raise InvalidRequest(f"Last-Event-ID must be an event id (an integer), got {value[:40]!r}") from None
