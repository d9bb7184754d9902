"""The router: a requested model (or `profile:<role>`) → an ordered list of models, tried in turn.

An upstream error, a timeout or a full queue falls through to the next model; the answer's
`model` says which one answered. A stream can fall through only before its first chunk: after
that the caller has already seen the other model's words.

With a `CallGuard`, every call is admitted first (rate limits, the worst case reserved on budgets),
its output is released only as the guard has checked it, and it is settled to the tokens used on
every path: an answer, an error, or a client that went away mid-stream.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import replace

from somaagent.core.errors import Overloaded, SomaError, UpstreamError
from somaagent.core.principal import Principal
from somaagent.models.catalog import PROFILE_PREFIX, ModelCatalog
from somaagent.models.messages import ChatChunk, ChatRequest, ChatResult, Embeddings
from somaagent.models.ports import CallGuard, CallTicket, ChatModel
from somaagent.models.token_bounds import prompt_token_bound, texts_token_bound

# (model id, seconds, outcome) for every attempt: metrics wrap the router through this.
AttemptObserver = Callable[[str, float, str], None]
ProfileLookup = Callable[[Principal, str], Awaitable[list[str]]]

_FALLTHROUGH = (UpstreamError, Overloaded)


class ModelRouter:
    """Resolves and calls models with fallback."""

    def __init__(
        self,
        catalog: ModelCatalog,
        profiles: ProfileLookup,
        observe: AttemptObserver | None = None,
        guard: CallGuard | None = None,
        default_max_tokens: int = 256,
    ) -> None:
        self.catalog = catalog
        self._profiles = profiles
        self._observe = observe or (lambda _m, _s, _o: None)
        self._guard = guard
        # What a request without max_tokens may generate at most (providers cap it there too).
        self._default_max_tokens = default_max_tokens

    async def candidates(self, principal: Principal, model: str) -> list[ChatModel]:
        """The chat models to try, in order."""
        if model.startswith(PROFILE_PREFIX):
            ids = await self._profiles(principal, model)
            return [self.catalog.chat(principal, model_id) for model_id in ids]
        return [self.catalog.chat(principal, model)]

    async def complete(self, principal: Principal, request: ChatRequest) -> ChatResult:
        """A whole answer from the first model that gives one (checked whole by the guard)."""
        models = await self.candidates(principal, request.model)
        admitted = await self._admit(principal, request, models)
        if admitted is None:
            return await self._complete(models, request)
        ticket = admitted.ticket
        spent = _Spent(request.model, admitted.prompt_bound)
        try:
            result = await self._complete(models, request)
            spent.streamed(result.model, result.message.content)
            spent.answered(result.model, result.usage.prompt_tokens, result.usage.completion_tokens)
            checked = await ticket.output(result.message.content or "") + await ticket.finish_output()
            if result.message.content is None:
                return result
            return replace(result, message=replace(result.message, content=checked))
        finally:
            await ticket.settle(*spent.usage())

    async def _complete(self, models: list[ChatModel], request: ChatRequest) -> ChatResult:
        failures: list[SomaError] = []
        for model in models:
            started = time.perf_counter()
            try:
                result = await model.complete(replace(request, model=model.id))
            except _FALLTHROUGH as exc:
                self._observe(model.id, time.perf_counter() - started, "error")
                failures.append(exc)
                continue
            except BaseException:
                self._observe(model.id, time.perf_counter() - started, "error")
                raise
            self._observe(model.id, time.perf_counter() - started, "ok")
            return result
        raise _exhausted(request.model, failures)

    async def stream(self, principal: Principal, request: ChatRequest) -> AsyncGenerator[ChatChunk, None]:
        """Chunks from the first model that starts answering; text only as the guard has checked it."""
        models = await self.candidates(principal, request.model)
        admitted = await self._admit(principal, request, models)
        chunks = self._stream(models, request)
        if admitted is None:
            try:
                async for chunk in chunks:
                    yield chunk
            finally:
                await chunks.aclose()
            return
        ticket = admitted.ticket
        spent = _Spent(request.model, admitted.prompt_bound)
        try:
            async for chunk in chunks:
                spent.streamed(chunk.model, chunk.content)
                released = await ticket.output(chunk.content) if chunk.content else ""
                if chunk.finish_reason is not None or chunk.usage is not None:
                    if chunk.usage is not None:
                        spent.answered(chunk.model, chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
                    released += await ticket.finish_output()
                if released or chunk.tool_calls or chunk.finish_reason is not None or chunk.usage is not None:
                    yield replace(chunk, content=released or None)
        finally:
            try:
                await chunks.aclose()
            finally:  # settled even if closing the model's stream was itself interrupted
                await ticket.settle(*spent.usage())

    async def _stream(self, models: list[ChatModel], request: ChatRequest) -> AsyncGenerator[ChatChunk, None]:
        failures: list[SomaError] = []
        for model in models:
            started = time.perf_counter()
            chunks = model.stream(replace(request, model=model.id))
            try:
                first = await anext(chunks)
            except _FALLTHROUGH as exc:
                await chunks.aclose()
                self._observe(model.id, time.perf_counter() - started, "error")
                failures.append(exc)
                continue
            outcome = "error"
            try:
                yield first
                async for chunk in chunks:
                    yield chunk
                outcome = "ok"
            finally:
                await chunks.aclose()
                self._observe(model.id, time.perf_counter() - started, outcome)
            return
        raise _exhausted(request.model, failures)

    async def embed(self, principal: Principal, model: str, texts: list[str]) -> Embeddings:
        """Vectors from the named embedding model (or the first of an `embedding` profile that answers)."""
        ids = await self._profiles(principal, model) if model.startswith(PROFILE_PREFIX) else [model]
        for model_id in ids:
            self.catalog.embedder(principal, model_id)  # unknown or forbidden: refused before admission
        if self._guard is None:
            return await self._embed(principal, model, ids, texts)
        bound = texts_token_bound(texts)
        ticket = await self._guard.admit(principal, "embedding", ids, bound, 0)
        used = (model, 0)  # a call that fails before answering used nothing
        try:
            result = await self._embed(principal, model, ids, texts)
            used = (result.model, result.prompt_tokens)
            return result
        finally:
            await ticket.settle(used[0], used[1], 0)

    async def _embed(self, principal: Principal, model: str, ids: list[str], texts: list[str]) -> Embeddings:
        failures: list[SomaError] = []
        for model_id in ids:
            embedder = self.catalog.embedder(principal, model_id)
            started = time.perf_counter()
            try:
                result = await embedder.embed(texts)
            except _FALLTHROUGH as exc:
                self._observe(model_id, time.perf_counter() - started, "error")
                failures.append(exc)
                continue
            self._observe(model_id, time.perf_counter() - started, "ok")
            return result
        raise _exhausted(model, failures)

    async def _admit(
        self, principal: Principal, request: ChatRequest, models: list[ChatModel]
    ) -> _Admitted | None:
        if self._guard is None:
            return None
        bound = prompt_token_bound(request)
        max_output = request.max_tokens if request.max_tokens is not None else self._default_max_tokens
        ticket = await self._guard.admit(principal, "chat", [m.id for m in models], bound, max_output)
        return _Admitted(ticket, bound)


class _Admitted:
    """An admitted call and the prompt bound it was admitted with."""

    __slots__ = ("prompt_bound", "ticket")

    def __init__(self, ticket: CallTicket, prompt_bound: int) -> None:
        self.ticket = ticket
        self.prompt_bound = prompt_bound


class _Spent:
    """What a call used, for settling. The model's own counts when it reported them; nothing for a call
    that failed before its first chunk; for a stream cut short, or counts an upstream left out, the
    prompt's bound and the bytes streamed (no token is shorter than a byte): over, never under."""

    __slots__ = ("_bound", "_reported", "_started", "_streamed", "model")

    def __init__(self, model: str, prompt_bound: int) -> None:
        self.model = model
        self._bound = prompt_bound
        self._streamed = 0
        self._started = False
        self._reported: tuple[int, int] | None = None

    def streamed(self, model: str, text: str | None) -> None:
        self.model, self._started = model, True
        if text:
            self._streamed += len(text.encode())

    def answered(self, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        # A zero is an upstream that reported nothing (no real prompt has no tokens): use the bounds.
        self.model, self._started = model, True
        self._reported = (prompt_tokens or self._bound, completion_tokens or self._streamed)

    def usage(self) -> tuple[str, int, int]:
        if self._reported is not None:
            return self.model, *self._reported
        if not self._started:
            return self.model, 0, 0
        return self.model, self._bound, self._streamed


def _exhausted(requested: str, failures: list[SomaError]) -> SomaError:
    if len(failures) == 1:
        return failures[0]
    if failures and all(isinstance(f, Overloaded) for f in failures):
        return failures[-1]
    detail = "; ".join(f.message for f in failures)
    return UpstreamError(f"every model behind {requested!r} failed: {detail}")
