"""The ports a model provider implements. Adapters are chosen in the app factory."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol

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
