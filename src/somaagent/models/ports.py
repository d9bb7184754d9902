"""The ports a model provider implements. Adapters are chosen in the app factory."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol

from somaagent.core.principal import Principal
from somaagent.models.messages import ChatChunk, ChatRequest, ChatResult, Embeddings


class ChatModel(Protocol):
    """Generates chat completions. `stream` yields chunks; closing the iterator cancels generation."""

    id: str
    context_window: int | None

    async def complete(self, request: ChatRequest) -> ChatResult: ...

    def stream(self, request: ChatRequest) -> AsyncGenerator[ChatChunk, None]: ...

    async def ready(self) -> None:
        """Raise if the model cannot be loaded or reached."""
        ...

    async def close(self) -> None: ...


class Embedder(Protocol):
    """Turns texts into vectors."""

    id: str
    dimensions: int

    async def embed(self, texts: list[str]) -> Embeddings: ...

    async def ready(self) -> None: ...

    async def close(self) -> None: ...


class CallTicket(Protocol):
    """One admitted model call (rate limits taken, budgets reserved): it checks the output as it comes
    and settles to the tokens really used. `settle` is called exactly once, on every path."""

    async def output(self, text: str) -> str:
        """The part of the output so far that may be shown (the rest is held until checked)."""
        ...

    async def finish_output(self) -> str:
        """The held tail, once the model has finished."""
        ...

    async def settle(self, model: str, prompt_tokens: int, completion_tokens: int) -> None: ...


class CallGuard(Protocol):
    """Admits model calls: limits, budgets and output checks wrap every call the router makes."""

    async def admit(
        self, principal: Principal, kind: str, models: list[str], prompt_tokens: int, max_output_tokens: int
    ) -> CallTicket:
        """Take the caller's rate limits and reserve the worst case on its budgets, or raise."""
        ...
