"""Assembling a streamed answer into a whole one, so every provider needs only `stream`."""

from __future__ import annotations

from collections.abc import AsyncIterator

from somaagent.core.errors import UpstreamError
from somaagent.models.messages import ChatChunk, ChatResult, FinishReason, Message, ToolCall, Usage


async def collect_stream(model_id: str, chunks: AsyncIterator[ChatChunk]) -> ChatResult:
    """Concatenate content and tool-call pieces; the last chunk's finish reason and usage win."""
    content: list[str] = []
    calls: dict[int, dict[str, str]] = {}
    finish: FinishReason | None = None
    usage: Usage | None = None
    answered_by = model_id
    async for chunk in chunks:
        answered_by = chunk.model
        if chunk.content:
            content.append(chunk.content)
        for delta in chunk.tool_calls:
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] = delta.id or call["id"]
            call["name"] = delta.name or call["name"]
            call["arguments"] += delta.arguments
        if chunk.finish_reason is not None:
            finish = chunk.finish_reason
        if chunk.usage is not None:
            usage = chunk.usage
    if finish is None or usage is None:
        raise UpstreamError(f"model {model_id!r} ended its answer without a finish reason or usage")
    tool_calls = tuple(ToolCall(**calls[i]) for i in sorted(calls))
    message = Message(
        role="assistant",
        content="".join(content) if content or not tool_calls else None,
        tool_calls=tool_calls,
    )
    return ChatResult(model=answered_by, message=message, finish_reason=finish, usage=usage)
