"""`/v1/memory`: remember, recall, RAG context, list, get, delete, export — scoped to the caller's tenant."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query
from starlette.responses import Response

from somaagent.api.deps import MemoryReadDep, MemoryWriteDep, ServicesDep, SessionDep
from somaagent.api.metering import record_model_call
from somaagent.api.openai.docs import error_responses
from somaagent.api.services import Services
from somaagent.core.principal import Principal
from somaagent.memory.rag import build_context
from somaagent.memory.schemas import (
    MemoryListOut,
    MemoryOut,
    PassageOut,
    RagOut,
    RecalledOut,
    RecallIn,
    RecallOut,
    RememberedOut,
    RememberIn,
)
from somaagent.memory.service import DEFAULT_NAMESPACE
from somaagent.models.messages import Usage
from somaagent.observability.context import current_request_id

router = APIRouter(prefix="/v1/memory", tags=["Memory"])
Namespace = Annotated[str, Query(description="Namespace, e.g. 'default' or 'user:alice'.")]


def _meter(services: Services, principal: Principal, tokens: int, started: float) -> None:
    record_model_call(
        services,
        principal,
        current_request_id() or "",
        services.settings.memory_embedding_model,
        "embedding",
        Usage(tokens, 0),
        time.perf_counter() - started,
        "ok",
    )


@router.post(
    "/remember", response_model=RememberedOut, status_code=201, responses=error_responses(400, 401, 404)
)
async def remember(
    body: RememberIn, principal: MemoryWriteDep, services: ServicesDep, session: SessionDep
) -> RememberedOut:
    started = time.perf_counter()
    done = await services.memory.remember(
        session, principal, body.text, body.metadata, body.namespace, body.ttl_seconds
    )
    await session.commit()
    _meter(services, principal, done.tokens, started)
    return RememberedOut(**MemoryOut.of(done.item).model_dump(), merged=done.merged)


@router.post("/recall", response_model=RecallOut, responses=error_responses(400, 401))
async def recall(
    body: RecallIn, principal: MemoryReadDep, services: ServicesDep, session: SessionDep
) -> RecallOut:
    started = time.perf_counter()
    found, tokens = await services.memory.recall(
        session, principal, body.query, body.top_k, body.namespace, body.filter, body.min_score
    )
    _meter(services, principal, tokens, started)
    return RecallOut(data=[RecalledOut.of_recalled(r) for r in found])


@router.post("/rag", response_model=RagOut, responses=error_responses(400, 401))
async def rag(body: RecallIn, principal: MemoryReadDep, services: ServicesDep, session: SessionDep) -> RagOut:
    started = time.perf_counter()
    found, tokens = await services.memory.recall(
        session, principal, body.query, body.top_k, body.namespace, body.filter, body.min_score
    )
    _meter(services, principal, tokens, started)
    context, passages = build_context(found)
    return RagOut(query=body.query, context=context, passages=[PassageOut.of(p) for p in passages])


@router.get("", response_model=MemoryListOut, responses=error_responses(400, 401))
async def list_memories(
    principal: MemoryReadDep,
    services: ServicesDep,
    session: SessionDep,
    namespace: Namespace = DEFAULT_NAMESPACE,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(description="Return memories after this id (paging).")] = None,
) -> MemoryListOut:
    rows = await services.memory.list(session, principal, namespace, limit + 1, after)
    return MemoryListOut(data=[MemoryOut.of(r) for r in rows[:limit]], has_more=len(rows) > limit)


@router.get("/export", responses=error_responses(400, 401))
async def export_memories(
    principal: MemoryReadDep,
    services: ServicesDep,
    session: SessionDep,
    namespace: Namespace = DEFAULT_NAMESPACE,
) -> Response:
    """Every live memory of a namespace as JSON lines (one `memory` object per line)."""
    lines: list[str] = []
    after: str | None = None
    while True:
        rows = await services.memory.list(session, principal, namespace, 1000, after)
        lines += [MemoryOut.of(r).model_dump_json() for r in rows]
        if len(rows) < 1000:
            break
        after = rows[-1].id
    return Response(
        "".join(line + "\n" for line in lines),
        media_type="application/x-ndjson",
        headers={"content-disposition": f'attachment; filename="memories-{namespace}.jsonl"'},
    )


@router.get("/{memory_id}", response_model=MemoryOut, responses=error_responses(401, 404))
async def get_memory(
    memory_id: str, principal: MemoryReadDep, services: ServicesDep, session: SessionDep
) -> MemoryOut:
    return MemoryOut.of(await services.memory.get(session, principal, memory_id))


@router.delete("/{memory_id}", response_model=MemoryOut, responses=error_responses(401, 404))
async def delete_memory(
    memory_id: str, principal: MemoryWriteDep, services: ServicesDep, session: SessionDep
) -> MemoryOut:
    item = await services.memory.delete(session, principal, memory_id)
    await session.commit()
    return MemoryOut.of(item)
