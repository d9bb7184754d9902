"""`GET /v1/usage`: usage by model and day for the caller's tenant (admins may pick one)."""

from __future__ import annotations

from datetime import date

from fastapi import APIRouter

from somaagent.analytics.schemas import UsageOut, UsageRowOut
from somaagent.analytics.usage import usage_by_model_day
from somaagent.api.deps import BillingReadDep, ServicesDep, SessionDep
from somaagent.api.openai.docs import error_responses
from somaagent.identity.service import get_tenant

router = APIRouter(prefix="/v1", tags=["Usage"])


@router.get("/usage", response_model=UsageOut, responses=error_responses(400, 401, 404))
async def get_usage(
    principal: BillingReadDep,
    services: ServicesDep,
    session: SessionDep,
    tenant: str | None = None,
    start: date | None = None,
    end: date | None = None,
) -> UsageOut:
    """Totals per (day, model). Usage events are written within `SOMA_OUTBOX_FLUSH_MS` of each call."""
    tenant_id = (await get_tenant(session, principal, tenant)).id if tenant else principal.tenant_id
    # Make this process's pending usage visible before reading (read-your-writes for the caller).
    await services.catch_up()
    rows = await usage_by_model_day(session, tenant_id, start, end)
    return UsageOut(
        tenant_id=tenant_id,
        data=[
            UsageRowOut(
                tenant_id=r.tenant_id,
                day=r.day,
                model=r.model,
                requests=r.requests,
                errors=r.errors,
                prompt_tokens=r.prompt_tokens,
                completion_tokens=r.completion_tokens,
                total_tokens=r.prompt_tokens + r.completion_tokens,
                avg_latency_ms=r.avg_latency_ms,
            )
            for r in rows
        ],
    )
