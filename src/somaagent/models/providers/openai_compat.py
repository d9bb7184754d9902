"""Any OpenAI-compatible server as an upstream: vLLM, Ollama, llama.cpp's server, OpenAI itself.

Upstream failures that another model could survive (connection errors, timeouts, 429, 5xx)
raise `UpstreamError`, which makes the router fall through to the next model; a 4xx that is the
request's fault raises `InvalidRequest` with the upstream's message, because another model
would refuse it too.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator
from dataclasses import replace
from typing import Any

import orjson

from somaagent.core.errors import InvalidRequest, UpstreamError
from somaagent.models.messages import (
    ChatChunk,
    ChatRequest,
    ChatResult,
    Embeddings,
    FinishReason,
    Message,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from somaagent.models.providers.upstream_http import UpstreamClient

_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}


_WIRE_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def wire_names(request: ChatRequest) -> dict[str, str]:
    """Our tool name → the name sent upstream. OpenAI allows only `[a-zA-Z0-9_-]{1,64}`, while our
    names may hold dots (`mcp.time.get_current_time`); the mapping is deterministic, so the answer's
    names map back with the same call."""
    names = {t.name for t in request.tools} | {c.name for m in request.messages for c in m.tool_calls}
    mapping = {n: n for n in names if _WIRE_NAME.fullmatch(n)}
    used = set(mapping)
    for name in sorted(names - set(mapping)):
        base = re.sub(r"[^a-zA-Z0-9_-]", "_", name)[:56]
        wire, n = base, 1
        while wire in used:
            n += 1
            wire = f"{base}_{n}"
        used.add(wire)
        mapping[name] = wire
    return mapping


def _message_json(message: Message, names: dict[str, str]) -> dict[str, Any]:
    data: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        data["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": names[c.name], "arguments": c.arguments}}
            for c in message.tool_calls
        ]
    if message.tool_call_id is not None:
        data["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        data["name"] = names.get(message.name, message.name)
    return data


def request_body(request: ChatRequest, upstream_model: str, stream: bool) -> dict[str, Any]:
    """The upstream's JSON body for `request`; only parameters the caller set are sent."""
    names = wire_names(request)
    body: dict[str, Any] = {
        "model": upstream_model,
        "messages": [_message_json(m, names) for m in request.messages],
    }
    optional = {
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "seed": request.seed,
        "user": request.user,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if request.stop:
        body["stop"] = list(request.stop)
    if request.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {"name": names[t.name], "description": t.description, "parameters": t.parameters},
            }
            for t in request.tools
        ]
        choice = request.tool_choice
        body["tool_choice"] = (
            {"type": "function", "function": {"name": names.get(choice.function or "", choice.function)}}
            if choice.mode == "function"
            else choice.mode
        )
    fmt = request.response_format
    if fmt.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt.type == "json_schema":
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": fmt.name or "response", "schema": fmt.schema or {}},
        }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


class OpenAICompatibleChatModel:
    """A `ChatModel` that forwards to an OpenAI-compatible `/chat/completions`."""

    def __init__(
        self,
        model_id: str,
        client: UpstreamClient,
        upstream_model: str,
        default_max_tokens: int | None = None,
    ) -> None:
        self.id = model_id
        self.context_window: int | None = None
        self._client = client
        self._upstream_model = upstream_model
        # Sent when the caller names no max_tokens: budgets reserve a completion of at most this, so an
        # upstream must not be left to generate until its own context runs out.
        self._default_max_tokens = default_max_tokens

    def _capped(self, request: ChatRequest) -> ChatRequest:
        if request.max_tokens is None and self._default_max_tokens is not None:
            return replace(request, max_tokens=self._default_max_tokens)
        return request

    async def ready(self) -> None:
        """Reachable if `/models` answers."""
        status, _ = await self._client.get("models")
        if status >= 500:
            raise UpstreamError(f"upstream for {self.id!r} answered {status}")

    async def close(self) -> None:
        """The HTTP client is shared per upstream and closed by its owner."""

    async def complete(self, request: ChatRequest) -> ChatResult:
        """One upstream round trip."""
        body = orjson.dumps(request_body(self._capped(request), self._upstream_model, stream=False))
        ours = {wire: name for name, wire in wire_names(request).items()}
        status, content = await self._client.post_json("chat/completions", body)
        _raise_for_status(self.id, status, content)
        try:
            data = orjson.loads(content)
            choice = data["choices"][0]
            message = choice["message"]
            calls = tuple(
                ToolCall(
                    id=c["id"],
                    name=ours.get(c["function"]["name"], c["function"]["name"]),
                    arguments=c["function"]["arguments"],
                )
                for c in message.get("tool_calls") or ()
            )
            usage = data.get("usage") or {}
            return ChatResult(
                model=self.id,
                message=Message(role="assistant", content=message.get("content"), tool_calls=calls),
                finish_reason=_FINISH.get(choice.get("finish_reason") or "stop", "stop"),
                usage=Usage(
                    prompt_tokens=int(usage.get("prompt_tokens", 0)),
                    completion_tokens=int(usage.get("completion_tokens", 0)),
                ),
            )
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise UpstreamError(f"upstream for {self.id!r} sent an answer we cannot read: {exc!r}") from exc

    async def stream(self, request: ChatRequest) -> AsyncGenerator[ChatChunk, None]:
        """Relay the upstream's SSE stream as chunks; the final chunk carries finish reason and usage."""
        body = orjson.dumps(request_body(self._capped(request), self._upstream_model, stream=True))
        ours = {wire: name for name, wire in wire_names(request).items()}
        finish: FinishReason | None = None
        usage: Usage | None = None
        pieces = 0
        try:
            async with self._client.stream_lines("chat/completions", body) as (status, lines):
                if status >= 400:
                    _raise_for_status(self.id, status, "\n".join([line async for line in lines]).encode())
                async for line in lines:
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    data = orjson.loads(payload)
                    if data.get("usage"):
                        u = data["usage"]
                        usage = Usage(int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0)))
                    for choice in data.get("choices") or ():
                        delta = choice.get("delta") or {}
                        calls = tuple(
                            ToolCallDelta(
                                index=c.get("index", 0),
                                id=c.get("id"),
                                name=_our_name(ours, (c.get("function") or {}).get("name")),
                                arguments=(c.get("function") or {}).get("arguments") or "",
                            )
                            for c in delta.get("tool_calls") or ()
                        )
                        if delta.get("content") or calls:
                            pieces += 1
                            yield ChatChunk(model=self.id, content=delta.get("content"), tool_calls=calls)
                        if choice.get("finish_reason"):
                            finish = _FINISH.get(choice["finish_reason"], "stop")
        except (KeyError, TypeError, ValueError) as exc:
            raise UpstreamError(f"upstream for {self.id!r} sent a chunk we cannot read: {exc!r}") from exc
        # Servers that ignore stream_options (llama.cpp's Python server) send no usage: they send one
        # token per chunk, so the chunk count is the completion; the prompt count is unknown (0).
        yield ChatChunk(model=self.id, finish_reason=finish or "stop", usage=usage or Usage(0, pieces))


def _our_name(ours: dict[str, str], wire: str | None) -> str | None:
    return None if wire is None else ours.get(wire, wire)


class OpenAICompatibleEmbedder:
    """An `Embedder` that forwards to an OpenAI-compatible `/embeddings`."""

    def __init__(self, model_id: str, client: UpstreamClient, upstream_model: str) -> None:
        self.id = model_id
        self.dimensions = 0  # learned from the first answer
        self._client = client
        self._upstream_model = upstream_model

    async def ready(self) -> None:
        """Reachable if an embedding of one word comes back."""
        await self.embed(["ready"])

    async def close(self) -> None:
        """The HTTP client is shared per upstream and closed by its owner."""

    async def embed(self, texts: list[str]) -> Embeddings:
        """Vectors from the upstream, as floats."""
        body = orjson.dumps({"model": self._upstream_model, "input": texts, "encoding_format": "float"})
        status, content = await self._client.post_json("embeddings", body)
        _raise_for_status(self.id, status, content)
        try:
            data = orjson.loads(content)
            items = sorted(data["data"], key=lambda item: item["index"])
            vectors = [list(map(float, item["embedding"])) for item in items]
            tokens = int((data.get("usage") or {}).get("prompt_tokens", 0))
        except (KeyError, TypeError, ValueError) as exc:
            raise UpstreamError(f"upstream for {self.id!r} sent an answer we cannot read: {exc!r}") from exc
        if vectors:
            self.dimensions = len(vectors[0])
        return Embeddings(model=self.id, vectors=vectors, prompt_tokens=tokens)


def _raise_for_status(model_id: str, status: int, content: bytes) -> None:
    if status < 400:
        return
    try:
        message = str(orjson.loads(content)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = content[:500].decode(errors="replace")
    if status == 429 or status >= 500 or status in (401, 403, 404, 408):
        # Not the caller's fault (or not only): another model may well answer.
        raise UpstreamError(f"upstream for {model_id!r} answered {status}: {message}")
    raise InvalidRequest(f"upstream for {model_id!r} refused the request: {message}")
