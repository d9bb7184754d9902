"""`POST /v1/chat/completions` with `model="agent:<persona>"`: the agent loop behind the OpenAI API.

The request's last message is the user's turn; the messages before it become the history of a new
session (or, with `x-soma-session-id`, the turn continues that session and earlier messages are
ignored). The agent's own tools run server-side; the answer is returned, or streamed as chunks, in
OpenAI's format. `x-soma-session-id` and `x-soma-run-id` response headers name the session and run.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import orjson
from fastapi import Request
from starlette.responses import Response, StreamingResponse

from somaagent.agents import sessions as agent_sessions
from somaagent.agents.event_log import follow_events
from somaagent.agents.personas import get_persona
from somaagent.agents.schemas import MessageIn, SessionIn
from somaagent.api.errors import error_body
from somaagent.api.openai.render import ChunkRenderer, completion_id, completion_json
from somaagent.api.openai.schemas import ChatCompletionRequest
from somaagent.api.services import Services
from somaagent.core.errors import InvalidRequest, UpstreamError
from somaagent.core.principal import Principal
from somaagent.models.messages import ChatChunk, ChatRequest, ChatResult, Message, Usage

AGENT_PREFIX = "agent:"
SESSION_HEADER = "x-soma-session-id"
# `agent:default` is the built-in assistant unless the tenant made a persona of that name.
DEFAULT_PERSONA = "default"


def is_agent_model(model: str) -> bool:
    """True for `agent:<persona>`."""
    return model.startswith(AGENT_PREFIX)


async def agent_completion(
    body: ChatCompletionRequest, chat: ChatRequest, request: Request, principal: Principal, services: Services
) -> Response:
    """Run the persona's agent on the request's last user message."""
    _refuse_client_tools(body)
    persona = chat.model[len(AGENT_PREFIX) :]
    last = chat.messages[-1]
    if last.role != "user" or not last.content:
        raise InvalidRequest(
            "with an agent model the last message must be the user's, with text", param="messages"
        )
    session_id = await _session_for(request, principal, services, persona, chat.messages[:-1])
    message = MessageIn(
        content=last.content, max_tokens=chat.max_tokens, temperature=chat.temperature, seed=chat.seed
    )
    started = await services.agents.start_run(principal, session_id, message)
    run_id = started.run_id
    headers = {SESSION_HEADER: session_id, "x-soma-run-id": run_id}
    if not body.stream:
        await services.agents.wait(run_id)
        run = await services.agents.get_run(principal, session_id, run_id)
        if run.status != "completed":
            raise UpstreamError(f"the agent run {run_id} ended {run.status}: {run.reason}")
        async with services.sessions() as db:
            answer = await agent_sessions.run_answer(db, principal.tenant_id, run_id)
        result = ChatResult(
            chat.model,
            Message("assistant", answer or ""),
            "stop",
            Usage(run.prompt_tokens, run.completion_tokens),
        )
        payload = completion_json(result, completion_id(), int(time.time()))
        return Response(orjson.dumps(payload), media_type="application/json", headers=headers)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    renderer = ChunkRenderer(completion_id(), include_usage)
    chunks = _chunks(services, principal, session_id, run_id, started.after, chat.model, renderer)
    return StreamingResponse(
        chunks,
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no", **headers},
    )


async def _chunks(
    services: Services,
    principal: Principal,
    session_id: str,
    run_id: str,
    after: int,
    model: str,
    renderer: ChunkRenderer,
) -> AsyncIterator[bytes]:
    finished = False
    try:
        yield renderer.role(model)
        events = follow_events(
            services.sessions,
            services.agents.streams,
            principal.tenant_id,
            session_id,
            after,
            until_run=run_id,
        )
        async for event in events:
            if event.type == "assistant.delta":
                yield renderer.chunk(ChatChunk(model=model, content=str(event.data["text"])))
            elif event.type == "run.completed":
                finished = True
                usage = event.data["usage"]
                yield renderer.chunk(ChatChunk(model=model, finish_reason="stop"))
                if renderer.include_usage:
                    yield renderer.usage(model, Usage(usage["prompt_tokens"], usage["completion_tokens"]))
            elif event.type == "run.failed":
                finished = True
                detail = f"the agent run {run_id} failed: {event.data['reason']}: {event.data['message']}"
                yield renderer.error(error_body(detail, "server_error", "agent_run_failed"))
        yield renderer.done()
    finally:
        if not finished:  # the client left: an OpenAI call that is abandoned stops
            await services.agents.cancel(principal, session_id, run_id)


async def _session_for(
    request: Request, principal: Principal, services: Services, persona: str, earlier: tuple[Message, ...]
) -> str:
    async with services.sessions() as db:
        if persona != DEFAULT_PERSONA:
            await get_persona(db, principal, persona)  # 404 naming the fix when there is no such persona
        existing = request.headers.get(SESSION_HEADER)
        if existing:
            return (await agent_sessions.get_session(db, principal, existing)).id
        history = [m for m in earlier if m.role != "system"]  # the persona's system prompt governs
        row = await agent_sessions.create_session_with_history(
            db, principal, SessionIn(persona=persona, metadata={"source": "chat.completions"}), history
        )
        await db.commit()
        return row.id


def _refuse_client_tools(body: ChatCompletionRequest) -> None:
    for param in ("tools", "tool_choice", "response_format", "stop"):
        if getattr(body, param) is not None:
            raise InvalidRequest(
                f"'{param}' is not supported with an agent model: the agent uses its persona's tools; "
                "send it to a model id instead",
                param=param,
            )
