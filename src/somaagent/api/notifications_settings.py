"""`/v1/notifications/preferences` (`notifications:read`: your own; admins name `?user_id=`) and
`/v1/notifications/webhooks` (`notifications:send`: the tenant's signed endpoints)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.api.deps import NotificationsReadDep, NotificationsSendDep, ServicesDep, SessionDep
from somaagent.api.openai.docs import error_responses
from somaagent.core.errors import Forbidden, InvalidRequest
from somaagent.core.pagination import ListOut
from somaagent.core.principal import Principal
from somaagent.events.outbox import audit
from somaagent.identity.capabilities import Capability
from somaagent.identity.service import act_for_tenant
from somaagent.notifications.preferences import (
    Preferences,
    email_of,
    read_preferences,
    save_preferences,
    validated,
)
from somaagent.notifications.quiet_hours import clock_text, quiet_hours
from somaagent.notifications.recipients import Recipient, require_user
from somaagent.notifications.tables import Webhook
from somaagent.notifications.webhooks import delete_webhook, list_webhooks, register_webhook

router = APIRouter(prefix="/v1/notifications", tags=["Notifications"])

TenantQuery = Annotated[
    str | None, Query(max_length=63, description="Tenant id or name (operators: any; others: their own).")
]


class QuietHoursIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start: str = Field(description="Local time the quiet hours begin, HH:MM (e.g. 22:00).")
    end: str = Field(description="Local time they end, HH:MM (e.g. 07:00; before `start` crosses midnight).")
    time_zone: str = Field(description="IANA time zone, e.g. Europe/Paris.")


class PreferencesIn(BaseModel):
    """How a person wants to be told (the whole set: PUT replaces it)."""

    model_config = ConfigDict(extra="forbid")

    channels: list[str] = Field(
        default=["websocket"], max_length=2, description="`websocket` and/or `email`."
    )
    min_severity: str = Field(default="info", description="Nothing below this reaches you.")
    email: str | None = Field(
        default=None, max_length=254, description="Default: your username, if an address."
    )
    quiet_hours: QuietHoursIn | None = Field(
        default=None, description="Held until they end (critical is not); null for none."
    )


class PreferencesOut(BaseModel):
    object: Literal["notification.preferences"] = "notification.preferences"
    user_id: str
    channels: list[str]
    min_severity: str
    email: str | None = Field(description="Where email goes (the address set, else the username if one).")
    quiet_hours: QuietHoursIn | None

    @classmethod
    def of(cls, person: Recipient, chosen: Preferences) -> PreferencesOut:
        quiet = chosen.quiet
        return cls(
            user_id=person.user_id,
            channels=list(chosen.channels),
            min_severity=chosen.min_severity,
            email=email_of(chosen, person.username),
            quiet_hours=QuietHoursIn(
                start=clock_text(quiet.start), end=clock_text(quiet.end), time_zone=quiet.time_zone
            )
            if quiet
            else None,
        )


async def _person(
    session: AsyncSession, principal: Principal, tenant: str | None, user_id: str | None
) -> tuple[str, Recipient]:
    """(tenant id, person) whose preferences: yours, or (notification admins) the named user of the
    tenant."""
    acting = await act_for_tenant(session, principal, tenant)
    if user_id is None:
        if acting.user_id is None or acting.tenant_id != principal.tenant_id:
            raise InvalidRequest(
                "preferences belong to a person and this credential is an API key (or acts for another "
                "tenant): log in as the user (POST /v1/auth/token), or name one with `?user_id=`",
                param="user_id",
            )
        user_id = acting.user_id
    elif user_id != acting.user_id and not principal.can(Capability.NOTIFICATIONS_SEND):
        raise Forbidden(
            "only those who may send notifications (`notifications:send`) manage other people's preferences",
            code="missing_capability",
        )
    return acting.tenant_id, await require_user(session, acting.tenant_id, user_id)


UserQuery = Annotated[str | None, Query(max_length=40, description="Another user's (admins).")]


@router.get("/preferences", response_model=PreferencesOut, responses=error_responses(400, 401, 403, 404))
async def get_preferences(
    principal: NotificationsReadDep,
    session: SessionDep,
    tenant: TenantQuery = None,
    user_id: UserQuery = None,
) -> PreferencesOut:
    """Your notification preferences (the defaults until you set them)."""
    tenant_id, person = await _person(session, principal, tenant, user_id)
    return PreferencesOut.of(person, await read_preferences(session, tenant_id, person.user_id))


@router.put("/preferences", response_model=PreferencesOut, responses=error_responses(400, 401, 403, 404))
async def put_preferences(
    body: PreferencesIn,
    principal: NotificationsReadDep,
    session: SessionDep,
    tenant: TenantQuery = None,
    user_id: UserQuery = None,
) -> PreferencesOut:
    """Replace your preferences (channels, minimum severity, quiet hours with a time zone, email)."""
    tenant_id, person = await _person(session, principal, tenant, user_id)
    quiet = body.quiet_hours
    chosen = validated(
        body.channels,
        body.min_severity,
        body.email,
        quiet_hours(quiet.start, quiet.end, quiet.time_zone) if quiet else None,
        person.username,
    )
    await save_preferences(session, tenant_id, person.user_id, chosen)
    await session.commit()
    return PreferencesOut.of(person, chosen)


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=2048, description="http:// or https:// endpoint that receives signed POSTs.")
    min_severity: str = Field(default="info", description="Only notifications at or above this.")
    secret: str | None = Field(default=None, description="16-256 characters; default: generated, shown once.")


class WebhookOut(BaseModel):
    id: str
    object: Literal["notification.webhook"] = "notification.webhook"
    tenant_id: str
    url: str
    min_severity: str
    created_at: datetime

    @classmethod
    def of(cls, row: Webhook) -> WebhookOut:
        return cls(
            id=row.id,
            tenant_id=row.tenant_id,
            url=row.url,
            min_severity=row.min_severity,
            created_at=row.created_at,
        )


class WebhookCreated(WebhookOut):
    secret: str = Field(description="Signs every delivery (x-soma-signature); shown only now.")


@router.post(
    "/webhooks", status_code=201, response_model=WebhookCreated, responses=error_responses(400, 401, 403, 404)
)
async def create_webhook(
    body: WebhookIn,
    principal: NotificationsSendDep,
    services: ServicesDep,
    session: SessionDep,
    tenant: TenantQuery = None,
) -> WebhookCreated:
    """Register an endpoint for the tenant's notifications; keep the returned `secret` to verify them."""
    acting = await act_for_tenant(session, principal, tenant)
    created = await register_webhook(
        session,
        services.notifications.sealer,
        acting.tenant_id,
        body.url,
        body.min_severity,
        body.secret,
        principal.subject,
    )
    # After the cheap checks (scheme, secret, the tenant's count); refused here, nothing is committed.
    await services.notifications.webhooks.check(body.url)
    audit(
        session,
        principal.subject,
        acting.tenant_id,
        "notification_webhook.created",
        webhook_id=created.webhook.id,
        url=body.url,
    )
    await session.commit()
    services.relay.poke()
    return WebhookCreated(**WebhookOut.of(created.webhook).model_dump(), secret=created.secret)


@router.get("/webhooks", response_model=ListOut[WebhookOut], responses=error_responses(401, 403, 404))
async def read_webhooks(
    principal: NotificationsSendDep, session: SessionDep, tenant: TenantQuery = None
) -> ListOut[WebhookOut]:
    """The tenant's webhooks (never their secrets)."""
    acting = await act_for_tenant(session, principal, tenant)
    return ListOut(data=[WebhookOut.of(w) for w in await list_webhooks(session, acting.tenant_id)])


@router.delete("/webhooks/{webhook_id}", response_model=WebhookOut, responses=error_responses(401, 403, 404))
async def remove_webhook(
    webhook_id: str,
    principal: NotificationsSendDep,
    services: ServicesDep,
    session: SessionDep,
    tenant: TenantQuery = None,
) -> WebhookOut:
    """Delete a webhook; deliveries to it not yet sent are cancelled."""
    acting = await act_for_tenant(session, principal, tenant)
    removed = await delete_webhook(session, acting.tenant_id, webhook_id)
    audit(session, principal.subject, acting.tenant_id, "notification_webhook.deleted", webhook_id=removed.id)
    await session.commit()
    services.relay.poke()
    return WebhookOut.of(removed)
