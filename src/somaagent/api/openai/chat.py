"""`POST /v1/chat/completions`: one answer, or an SSE stream of chunks ending in `data: [DONE]`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import TypeVar

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response, StreamingResponse

from somaagent.api.deps import InferenceDep, ServicesDep
from somaagent.api.errors import error_body, status_for
from somaagent.api.metering import record_model_call
from somaagent.api.openai.agent_chat import agent_completion, is_agent_model
from somaagent.api.openai.docs import ChatCompletionOut, error_responses
from somaagent.api.openai.render import ChunkRenderer, completion_id, completion_json
from somaagent.api.openai.schemas import ChatCompletionRequest
from somaagent.api.services import Services
from somaagent.core.errors import NotFound, PolicyDenied, SomaError
from somaagent.core.principal import Principal
from somaagent.models.messages import ChatChunk, ChatRequest, Usage
from somaagent.observability.context import current_request_id
from somaagent.policy.evaluator import EvalRequest

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])
T = TypeVar("T")


class ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


@router.post(
    "/chat/completions",
    response_model=ChatCompletionOut,
    responses=error_responses(400, 401, 402, 403, 404, 413, 423, 429, 502, 503),
    summary="Create a chat completion (OpenAI-compatible; `stream: true` for SSE)",
)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, principal: InferenceDep, services: ServicesDep
) -> Response:
    chat = body.to_chat_request()
    if is_agent_model(chat.model):
        return await agent_completion(body, chat, request, principal, services)
    await services.policy.require(principal, chat_input(principal, chat))
    request_id = current_request_id() or completion_id()
    started = time.perf_counter()
    if not body.stream:
        try:
            result = await _until_disconnected(request, services.router.complete(principal, chat))
        except ClientGone:
            _record(services, principal, request_id, chat.model, None, started, "cancelled")
            return Response(status_code=499)
        except SomaError as exc:
            _record_failure(services, principal, request_id, chat.model, started, exc)
            raise
        _record(services, principal, request_id, result.model, result.usage, started, "ok")
        payload = completion_json(result, completion_id(), int(time.time()))
        return Response(orjson.dumps(payload), media_type="application/json")

    chunks = services.router.stream(principal, chat)
    try:
        # Wait for the first chunk before answering, so that errors (unknown model, context
        # length, full queue) get their real HTTP status rather than an in-band error.
        first = await _until_disconnected(request, anext(chunks))
    except ClientGone:
        await chunks.aclose()
        _record(services, principal, request_id, chat.model, None, started, "cancelled")
        return Response(status_code=499)
    except SomaError as exc:
        await chunks.aclose()
        _record_failure(services, principal, request_id, chat.model, started, exc)
        raise
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    renderer = ChunkRenderer(completion_id(), include_usage)
    events = _sse(services, principal, request_id, started, renderer, first, chunks)
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )


async def _sse(
    services: Services,
    principal: Principal,
    request_id: str,
    started: float,
    renderer: ChunkRenderer,
    first: ChatChunk,
    chunks: AsyncGenerator[ChatChunk, None],
) -> AsyncIterator[bytes]:
    model = first.model
    usage: Usage | None = None
    pieces = 0
    recorded = False

    def record(status: str) -> None:
        # Called before the closing frames: a client that has read `[DONE]` and then asks
        # /v1/usage must find this call there (read-your-writes).
        nonlocal recorded
        if not recorded:
            recorded = True
            spent = usage or Usage(prompt_tokens=0, completion_tokens=pieces)  # cut short: what was produced
            _record(services, principal, request_id, model, spent, started, status)

    try:
        yield renderer.role(model)
        chunk: ChatChunk | None = first
        while chunk is not None:
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.content or chunk.tool_calls or chunk.finish_reason:
                pieces += 1
                yield renderer.chunk(chunk)
            chunk = await anext(chunks, None)
        record("ok")
        if renderer.include_usage and usage is not None:
            yield renderer.usage(model, usage)
        yield renderer.done()
    except SomaError as exc:
        record(exc.code)
        if isinstance(exc, PolicyDenied):  # the output broke a rule: what was shown had passed the check
            yield renderer.chunk(ChatChunk(model, finish_reason="content_filter"))
        _, type_ = status_for(exc)
        body = error_body(exc.message, type_, exc.code, exc.param)
        body["error"].update(exc.extra)
        yield renderer.error(body)
        yield renderer.done()
    except Exception as exc:
        record("internal_error")
        log.exception("stream failed")
        yield renderer.error(
            error_body(f"the stream failed (request id {request_id})", "server_error", "internal_error")
        )
        del exc
        yield renderer.done()
    finally:
        await chunks.aclose()  # stops generation if the client went away
        record("cancelled")  # the client left before the end


def chat_input(principal: Principal, chat: ChatRequest) -> EvalRequest:
    """The `chat.input` check of a completion: every message's text and tool-call arguments, as one
    content."""
    pieces = [m.content for m in chat.messages if m.content]
    pieces += [call.arguments for m in chat.messages for call in m.tool_calls]
    content = "\n".join(pieces)
    return EvalRequest(
        "chat.input",
        principal.subject,
        f"model:{chat.model}",
        content,
        {"model": chat.model},
    )


def _record(
    services: Services,
    principal: Principal,
    request_id: str,
    model: str,
    usage: Usage | None,
    started: float,
    status: str,
) -> None:
    record_model_call(
        services, principal, request_id, model, "chat", usage, time.perf_counter() - started, status
    )


def _record_failure(
    services: Services, principal: Principal, request_id: str, model: str, started: float, exc: SomaError
) -> None:
    if not isinstance(exc, NotFound):  # no model was called for an unknown model
        _record(services, principal, request_id, model, None, started, exc.code)


async def _until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work` in this task; a watcher cancels it (and we raise `ClientGone`) if the client
    disconnects first. One extra task per request, not two."""
    current = asyncio.current_task()
    assert current is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        await _disconnected(request)
        gone = True
        current.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        result = await work
    except asyncio.CancelledError:
        if gone:
            raise ClientGone from None
        raise
    finally:
        watcher.cancel()
    if gone:  # the client left just as the work finished: take back the pending cancellation
        current.uncancel()
        raise ClientGone
    return result


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
