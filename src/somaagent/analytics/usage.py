"""Usage: the `model.usage` consumer and the per-model, per-day rollup."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

from sqlalchemy import case, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.analytics.tables import UsageRecord
from somaagent.db.statements import insert_rows_skipping_duplicates
from somaagent.events.schemas import Event


async def store_usage(session: AsyncSession, events: Sequence[Event]) -> None:
    """The `model.usage` handler: one usage record per event, however often it is delivered."""
    rows = [
        {
            "event_id": e.id,
            "tenant_id": e.tenant_id,
            "request_id": e.data["request_id"],
            "key_id": e.data.get("key_id"),
            "model": e.data["model"],
            "kind": e.data.get("kind", "chat"),
            "prompt_tokens": int(e.data.get("prompt_tokens", 0)),
            "completion_tokens": int(e.data.get("completion_tokens", 0)),
            "latency_ms": int(e.data.get("latency_ms", 0)),
            "status": str(e.data.get("status", "ok")),
            "occurred_at": e.occurred_at,
            "day": e.occurred_at.date().isoformat(),
        }
        for e in events
    ]
    await insert_rows_skipping_duplicates(session, UsageRecord.__table__, rows, conflict=["event_id"])


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Totals for one tenant, model and day."""

    tenant_id: str
    day: str
    model: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    avg_latency_ms: float


async def usage_by_model_day(
    session: AsyncSession, tenant_id: str, start: date | None = None, end: date | None = None
) -> list[UsageRow]:
    """Usage of one tenant grouped by day and model, oldest first; `start`/`end` are inclusive."""
    query = (
        select(
            UsageRecord.day,
            UsageRecord.model,
            func.count(),
            func.sum(case((UsageRecord.status != "ok", 1), else_=0)),
            func.sum(UsageRecord.prompt_tokens),
            func.sum(UsageRecord.completion_tokens),
            func.avg(UsageRecord.latency_ms),
        )
        .where(UsageRecord.tenant_id == tenant_id)
        .group_by(UsageRecord.day, UsageRecord.model)
        .order_by(UsageRecord.day, UsageRecord.model)
    )
    if start is not None:
        query = query.where(UsageRecord.day >= start.isoformat())
    if end is not None:
        query = query.where(UsageRecord.day <= end.isoformat())
    return [
        UsageRow(
            tenant_id=tenant_id,
            day=day,
            model=model,
            requests=int(requests),
            errors=int(errors or 0),
            prompt_tokens=int(prompt or 0),
            completion_tokens=int(completion or 0),
            avg_latency_ms=round(float(latency or 0), 1),
        )
        for day, model, requests, errors, prompt, completion, latency in (await session.execute(query)).all()
    ]
