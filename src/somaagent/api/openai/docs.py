"""Response models for the OpenAPI document only (routes return pre-rendered JSON for speed)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel


class ErrorObject(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error: OpenAI's shape."""

    error: ErrorObject


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: the listed statuses, each with the error schema."""
    described = {
        400: "Invalid request (the message names the parameter)",
        401: "Missing, invalid, expired or revoked credentials",
        402: "A budget would be exceeded (the body names it and when it resets)",
        403: "The credential lacks the capability this needs",
        404: "Not found (for models: the message lists the available ids)",
        409: "Conflicts with existing state",
        413: "Request body too large",
        423: "The tenant is in training mode (the message names the lock holder)",
        429: "Rate limited (see Retry-After)",
        502: "Every upstream model failed",
        503: "Model queue full (see Retry-After)",
    }
    return {s: {"model": ErrorResponse, "description": described[s]} for s in statuses}


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class FunctionOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionOut


class MessageOut(BaseModel):
    role: Literal["assistant"]
    content: str | None
    refusal: str | None
    tool_calls: list[ToolCallOut] | None = None


class ChoiceOut(BaseModel):
    index: int
    message: MessageOut
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter"]
    logprobs: None


class ChatCompletionOut(BaseModel):
    """A chat completion (with `stream: true`, an SSE stream of `chat.completion.chunk` objects)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChoiceOut]
    usage: UsageOut


class EmbeddingOut(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str


class EmbeddingUsageOut(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingListOut(BaseModel):
    object: Literal["list"]
    data: list[EmbeddingOut]
    model: str
    usage: EmbeddingUsageOut


class ModelOut(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelListOut(BaseModel):
    object: Literal["list"]
    data: list[ModelOut]
