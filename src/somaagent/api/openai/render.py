"""Normalized results → OpenAI JSON (bodies and SSE chunks), valid against the official spec."""

from __future__ import annotations

import base64
import time
from typing import Any

import numpy as np
import orjson

from somaagent.core.ids import new_id
from somaagent.models.messages import ChatChunk, ChatResult, Embeddings, Usage

FINGERPRINT = "fp_somaagent"


def completion_id() -> str:
    """`chatcmpl-...`"""
    return "chatcmpl-" + new_id("x")[2:]


def usage_json(usage: Usage) -> dict[str, int]:
    """The `usage` object."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def completion_json(result: ChatResult, response_id: str, created: int) -> dict[str, Any]:
    """A `chat.completion` object."""
    message: dict[str, Any] = {"role": "assistant", "content": result.message.content, "refusal": None}
    if result.message.tool_calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in result.message.tool_calls
        ]
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": created,
        "model": result.model,
        "system_fingerprint": FINGERPRINT,
        "choices": [
            {"index": 0, "message": message, "finish_reason": result.finish_reason, "logprobs": None}
        ],
        "usage": usage_json(result.usage),
    }


class ChunkRenderer:
    """Renders one stream's chunks as SSE `data:` lines with a shared id and creation time."""

    def __init__(self, response_id: str, include_usage: bool) -> None:
        self.id = response_id
        self.created = int(time.time())
        self.include_usage = include_usage

    def _frame(self, model: str, choices: list[dict[str, Any]], usage: Usage | None = None) -> bytes:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = usage_json(usage) if usage is not None else None
        return b"data: " + orjson.dumps(body) + b"\n\n"

    def role(self, model: str) -> bytes:
        """The opening chunk that names the role."""
        return self._frame(
            model,
            [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "finish_reason": None,
                    "logprobs": None,
                }
            ],
        )

    def chunk(self, chunk: ChatChunk) -> bytes:
        """A content / tool-call / finish chunk (the usage goes in its own trailing chunk)."""
        delta: dict[str, Any] = {}
        if chunk.content:
            delta["content"] = chunk.content
        if chunk.tool_calls:
            delta["tool_calls"] = [_tool_delta(d.index, d.id, d.name, d.arguments) for d in chunk.tool_calls]
        return self._frame(
            chunk.model,
            [{"index": 0, "delta": delta, "finish_reason": chunk.finish_reason, "logprobs": None}],
        )

    def usage(self, model: str, usage: Usage) -> bytes:
        """The final `choices: []` chunk carrying usage (only with include_usage)."""
        return self._frame(model, [], usage)

    @staticmethod
    def done() -> bytes:
        """The end-of-stream marker."""
        return b"data: [DONE]\n\n"

    @staticmethod
    def error(body: dict[str, Any]) -> bytes:
        """An error after the stream started (headers are gone, so it travels in-band)."""
        return b"data: " + orjson.dumps(body) + b"\n\n"


def _tool_delta(index: int, call_id: str | None, name: str | None, arguments: str) -> dict[str, Any]:
    data: dict[str, Any] = {"index": index}
    if call_id is not None:
        data["id"] = call_id
        data["type"] = "function"
    function: dict[str, str] = {"arguments": arguments}
    if name is not None:
        function["name"] = name
    data["function"] = function
    return data


def embeddings_json(result: Embeddings, encoding: str, dimensions: int | None) -> dict[str, Any]:
    """A `list` of `embedding` objects, float or base64 (little-endian float32, as OpenAI sends)."""
    matrix = np.asarray(result.vectors, dtype=np.float32)
    if dimensions is not None and matrix.size:
        # Matryoshka-style shortening, renormalized so cosine similarity still works.
        matrix = matrix[:, :dimensions]
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        matrix = (matrix / np.where(norms == 0, 1, norms)).astype(np.float32)
    data: list[dict[str, Any]] = []
    for index, row in enumerate(matrix):
        embedding: Any = (
            base64.b64encode(row.astype("<f4").tobytes()).decode() if encoding == "base64" else row.tolist()
        )
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    return {
        "object": "list",
        "data": data,
        "model": result.model,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }
