"""The router: a requested model (or `profile:<role>`) → an ordered list of models, tried in turn.

An upstream error, a timeout or a full queue falls through to the next model; the answer's
`model` says which one answered. A stream can fall through only before its first chunk: after
that the caller has already seen the other model's words.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import replace

from somaagent.core.errors import Overloaded, SomaError, UpstreamError
from somaagent.core.principal import Principal
from somaagent.models.catalog import PROFILE_PREFIX, ModelCatalog
from somaagent.models.messages import ChatChunk, ChatRequest, ChatResult, Embeddings
from somaagent.models.ports import ChatModel

# (model id, seconds, outcome) for every attempt: metrics wrap the router through this.
AttemptObserver = Callable[[str, float, str], None]
ProfileLookup = Callable[[Principal, str], Awaitable[list[str]]]

_FALLTHROUGH = (UpstreamError, Overloaded)


class ModelRouter:
    """Resolves and calls models with fallback."""

    def __init__(
        self, catalog: ModelCatalog, profiles: ProfileLookup, observe: AttemptObserver | None = None
    ) -> None:
        self.catalog = catalog
        self._profiles = profiles
        self._observe = observe or (lambda _m, _s, _o: None)

    async def candidates(self, principal: Principal, model: str) -> list[ChatModel]:
        """The chat models to try, in order."""
        if model.startswith(PROFILE_PREFIX):
            ids = await self._profiles(principal, model)
            return [self.catalog.chat(principal, model_id) for model_id in ids]
        return [self.catalog.chat(principal, model)]

    async def complete(self, principal: Principal, request: ChatRequest) -> ChatResult:
        """A whole answer from the first model that gives one."""
        failures: list[SomaError] = []
        for model in await self.candidates(principal, request.model):
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
        """Chunks from the first model that starts answering."""
        failures: list[SomaError] = []
        for model in await self.candidates(principal, request.model):
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


def _exhausted(requested: str, failures: list[SomaError]) -> SomaError:
    if len(failures) == 1:
        return failures[0]
    if failures and all(isinstance(f, Overloaded) for f in failures):
        return failures[-1]
    detail = "; ".join(f.message for f in failures)
    return UpstreamError(f"every model behind {requested!r} failed: {detail}")
