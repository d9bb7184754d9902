"""`GET /v1/audit`: the audit log, tenant-scoped (operators see every tenant, or pick one), filtered and
paged."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel

from somaagent.api.deps import AuditReadDep, ServicesDep, SessionDep
from somaagent.api.openai.docs import error_responses
from somaagent.audit.queries import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    AuditFilter,
    list_audit,
    parse_timestamp,
    resolve_after,
)
from somaagent.audit.tables import AuditRecord
from somaagent.core.errors import InvalidRequest
from somaagent.identity.service import get_tenant

router = APIRouter(prefix="/v1", tags=["Audit"])


class AuditEventOut(BaseModel):
    id: str
    type: str
    tenant_id: str | None
    actor: str | None
    occurred_at: datetime
    data: dict[str, Any]

    @classmethod
    def of(cls, record: AuditRecord) -> AuditEventOut:
        return cls(
            id=record.id,
            type=record.type,
            tenant_id=record.tenant_id,
            actor=record.actor,
            occurred_at=record.occurred_at,
            data=record.data,
        )


class AuditListOut(BaseModel):
    object: Literal["list"] = "list"
    data: list[AuditEventOut]
    has_more: bool
    next_after: str | None


@router.get("/audit", response_model=AuditListOut, responses=error_responses(400, 401, 403, 404))
async def read_audit(
    principal: AuditReadDep,
    services: ServicesDep,
    session: SessionDep,
    tenant: Annotated[
        str | None, Query(max_length=63, description="Tenant id or name (operators: any; others: their own).")
    ] = None,
    event_type: Annotated[
        str | None,
        Query(
            alias="type",
            min_length=1,
            max_length=64,
            description="An event type (`api_key.created`), or a prefix ending in `.` (`auth.`).",
        ),
    ] = None,
    actor: Annotated[str | None, Query(min_length=1, max_length=255, description="e.g. `key:key_…`.")] = None,
    since: Annotated[str | None, Query(description="RFC 3339; events at or after this time.")] = None,
    until: Annotated[str | None, Query(description="RFC 3339; events before this time.")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    after: Annotated[
        str | None,
        Query(min_length=1, max_length=200, description="`next_after` of the previous page, or an event id."),
    ] = None,
) -> AuditListOut:
    """Audit events oldest first (by time, then id). An action appears within about a second."""
    start = parse_timestamp(since, "since") if since is not None else None
    end = parse_timestamp(until, "until") if until is not None else None
    if start is not None and end is not None and start >= end:
        raise InvalidRequest("`until` must be later than `since`", param="until")
    # Make this process's pending events visible before reading (read-your-writes for the caller).
    await services.catch_up()
    where = AuditFilter(
        tenant_id=(await get_tenant(session, principal, tenant)).id if tenant is not None else None,
        type=event_type,
        actor=actor,
        since=start,
        until=end,
    )
    cursor = await resolve_after(session, principal, after) if after is not None else None
    page = await list_audit(session, principal, where, limit, cursor)
    return AuditListOut(
        data=[AuditEventOut.of(r) for r in page.records], has_more=page.has_more, next_after=page.next_after
    )
