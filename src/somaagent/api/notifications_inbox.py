"""`/v1/notifications/backlog`, `/{id}`, `/{id}/read` (`notifications:read`) and `/deliveries`
(`notifications:send`): reading notifications and how their deliveries went. Operators name a tenant
with `?tenant=`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel

from somaagent.api.deps import NotificationsReadDep, NotificationsSendDep, ServicesDep, SessionDep
from somaagent.api.openai.docs import error_responses
from somaagent.core.principal import Principal
from somaagent.identity.capabilities import Capability
from somaagent.identity.service import act_for_tenant
from somaagent.notifications.inbox import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    Reader,
    backlog,
    deliveries_of,
    list_deliveries,
    mark_read,
    visible_notification,
)
from somaagent.notifications.payloads import notification_json

router = APIRouter(prefix="/v1/notifications", tags=["Notifications"])

TenantQuery = Annotated[
    str | None, Query(max_length=63, description="Tenant id or name (operators: any; others: their own).")
]
LimitQuery = Annotated[int, Query(ge=1, le=MAX_LIMIT)]
AfterQuery = Annotated[
    str | None, Query(min_length=1, max_length=200, description="`next_after` of the previous page.")
]


class PageOut(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    has_more: bool
    next_after: str | None


class NotificationOut(BaseModel):
    """A notification; `deliveries` only for those who may send notifications."""

    model_config = {"extra": "allow"}

    id: str
    object: Literal["notification"] = "notification"
    tenant_id: str
    kind: str
    severity: str
    message: str
    audience: str
    user_id: str | None
    channel: str | None
    metadata: dict[str, Any]
    created_at: str


def reader_of(principal: Principal) -> Reader:
    """The reader a caller is (notification admins hold `notifications:send`)."""
    return Reader(
        tenant_id=principal.tenant_id,
        subject=principal.subject,
        user_id=principal.user_id,
        is_admin=principal.can(Capability.NOTIFICATIONS_SEND),
    )


@router.get("/backlog", response_model=PageOut, responses=error_responses(400, 401, 403, 404))
async def read_backlog(
    principal: NotificationsReadDep,
    services: ServicesDep,
    session: SessionDep,
    tenant: TenantQuery = None,
    limit: LimitQuery = DEFAULT_LIMIT,
    after: AfterQuery = None,
) -> PageOut:
    """Your unread notifications (for you, your tenant, or its admins), held ones included, newest first.
    Each says `status` for you: `queued`, `held` (quiet hours, until `held_until`) or `delivered`."""
    await services.relay.catch_up()  # what this process just queued is recorded
    acting = await act_for_tenant(session, principal, tenant)
    page = await backlog(session, reader_of(acting), limit, after)
    return PageOut(data=page.items, has_more=page.has_more, next_after=page.next_after)


@router.get("/deliveries", response_model=PageOut, responses=error_responses(400, 401, 403, 404))
async def read_deliveries(
    principal: NotificationsSendDep,
    session: SessionDep,
    tenant: TenantQuery = None,
    status: Annotated[
        str | None, Query(description="pending, held, sending, sent, dead (the dead letters) or cancelled.")
    ] = None,
    channel: Annotated[str | None, Query(description="websocket, email or webhook.")] = None,
    limit: LimitQuery = DEFAULT_LIMIT,
    after: AfterQuery = None,
) -> PageOut:
    """The tenant's deliveries, newest first, with attempts and the last error."""
    acting = await act_for_tenant(session, principal, tenant)
    page = await list_deliveries(session, acting.tenant_id, status, channel, limit, after)
    return PageOut(data=page.items, has_more=page.has_more, next_after=page.next_after)


@router.get("/{notification_id}", response_model=NotificationOut, responses=error_responses(401, 403, 404))
async def read_notification(
    notification_id: str, principal: NotificationsReadDep, session: SessionDep, tenant: TenantQuery = None
) -> dict[str, Any]:
    """One notification you may see; admins also get its deliveries."""
    acting = await act_for_tenant(session, principal, tenant)
    reader = reader_of(acting)
    found = await visible_notification(session, reader, notification_id)
    body = notification_json(found)
    if reader.is_admin:
        body["deliveries"] = await deliveries_of(session, acting.tenant_id, found.id)
    return body


@router.post(
    "/{notification_id}/read", response_model=NotificationOut, responses=error_responses(401, 403, 404)
)
async def read_one(
    notification_id: str, principal: NotificationsReadDep, session: SessionDep, tenant: TenantQuery = None
) -> dict[str, Any]:
    """Mark a notification read for you: it leaves your backlog (not anyone else's)."""
    acting = await act_for_tenant(session, principal, tenant)
    found = await mark_read(session, reader_of(acting), notification_id)
    await session.commit()
    return notification_json(found) | {"read": True}
