"""`/v1/notifications`: queueing a notification, and the component the app factory builds (the consumer of
`notifications.outbound`, the delivery worker, the live hub and its fan-out). The other routes live in
`notifications_inbox.py` (backlog, read, deliveries), `notifications_settings.py` (preferences, webhooks)
and `notifications_socket.py` (live push)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from somaagent.api import notifications_inbox, notifications_settings, notifications_socket
from somaagent.api.composition import Check, Platform
from somaagent.api.deps import NotificationsSendDep, ServicesDep, SessionDep
from somaagent.api.openai.docs import error_responses
from somaagent.api.webhook_poster import GuardedWebhookPoster
from somaagent.config import Settings
from somaagent.events.consumers import ConsumerSpec
from somaagent.events.schemas import NOTIFICATIONS_OUTBOUND
from somaagent.identity.secret_box import SecretBox
from somaagent.identity.service import act_for_tenant
from somaagent.notifications.channels import EmailSender, Sender, SmtpSettings, SocketSender, WebhookSender
from somaagent.notifications.consumer import NotificationsConsumer
from somaagent.notifications.fanout import Fanout, LocalFanout, RedisFanout
from somaagent.notifications.live import LiveHub
from somaagent.notifications.queue import MAX_MESSAGE, queue_notification
from somaagent.notifications.webhooks import Sealer
from somaagent.notifications.worker import DeliveryWorker, RetryPolicy

router = APIRouter()
# Fixed paths before `/{notification_id}`, which would match them.
for _module in (notifications_settings, notifications_socket, notifications_inbox):
    router.include_router(_module.router)

WEBHOOK_TIMEOUT_S = 10.0  # a receiver slower than this fails the attempt (retried with backoff)


class NotificationIn(BaseModel):
    """A notification to queue for a tenant's people (and its webhooks)."""

    model_config = ConfigDict(extra="forbid")

    tenant_id: str | None = Field(
        default=None, max_length=63, description="Tenant id or name (operators; default: your own)."
    )
    channel: str | None = Field(
        default=None,
        description="`websocket`, `email` or `webhook`; null lets each person's preferences decide.",
    )
    severity: str = Field(
        description="`info`, `warning`, `error` or `critical` (critical ignores quiet hours)."
    )
    message: str = Field(max_length=MAX_MESSAGE, description="The text (at most 4000 characters).")
    metadata: dict[str, Any] | None = Field(default=None, description="A JSON object, at most 16 KB.")
    user_id: str | None = Field(
        default=None, max_length=40, description="One person of the tenant; default: everyone in it."
    )


class NotificationQueued(BaseModel):
    id: str
    object: Literal["notification"] = "notification"
    status: Literal["queued"] = "queued"
    tenant_id: str
    kind: str
    severity: str
    message: str
    audience: str
    user_id: str | None
    channel: str | None
    metadata: dict[str, Any]
    created_at: datetime


@router.post(
    "/v1/notifications",
    tags=["Notifications"],
    status_code=202,
    response_model=NotificationQueued,
    responses=error_responses(400, 401, 403, 404),
)
async def send_notification(
    body: NotificationIn, principal: NotificationsSendDep, services: ServicesDep, session: SessionDep
) -> NotificationQueued:
    """Queue a notification: it is delivered within about a second to the sockets, inboxes and webhooks
    the audience and everyone's preferences choose."""
    acting = await act_for_tenant(session, principal, body.tenant_id)
    event = await queue_notification(
        session,
        acting.tenant_id,
        principal.subject,
        severity=body.severity,
        message=body.message,
        channel=body.channel,
        metadata=body.metadata,
        user_id=body.user_id,
    )
    await session.commit()
    services.relay.poke()
    data = event.data
    return NotificationQueued(
        id=data["notification_id"],
        tenant_id=acting.tenant_id,
        kind=data["kind"],
        severity=data["severity"],
        message=data["message"],
        audience=data["audience"],
        user_id=data["user_id"],
        channel=data["channel"],
        metadata=data["metadata"],
        created_at=event.occurred_at,
    )


@dataclass
class NotificationsComponent:
    """What the app factory wires: the `notifications` consumer group, the fan-out's readiness, and the
    delivery worker and live hub's lifecycle. Routes reach the hub and sealer through it."""

    hub: LiveHub
    fanout: Fanout
    sealer: Sealer
    worker: DeliveryWorker
    webhooks: GuardedWebhookPoster
    consumers: list[ConsumerSpec] = field(default_factory=list)
    readiness: list[tuple[str, Check]] = field(default_factory=list)

    async def start(self) -> None:
        """Join the fan-out, then start delivering."""
        await self.fanout.start(self.hub.receive)
        self.worker.start()

    async def close(self) -> None:
        """Stop delivering, leave the fan-out."""
        await self.worker.close()
        await self.fanout.close()
        await self.webhooks.close()


def build_fanout(settings: Settings) -> Fanout:
    """`SOMA_NOTIFICATIONS_FANOUT`, or Redis when the counters are shared there."""
    chosen = settings.notifications_fanout or ("redis" if settings.counters == "redis" else "local")
    if chosen == "redis":
        return RedisFanout(settings.redis_url, channel=f"{settings.event_stream_prefix}:notifications")
    return LocalFanout()


def build_notifications(platform: Platform) -> NotificationsComponent:
    """The notifications component of this process."""
    settings = platform.settings
    fanout = build_fanout(settings)
    sealer = SecretBox(platform.secret, "webhook-secrets")
    webhooks = GuardedWebhookPoster(settings.webhook_allowlist_entries, WEBHOOK_TIMEOUT_S)
    senders: dict[str, Sender] = {
        "websocket": SocketSender(fanout),
        "email": EmailSender(
            SmtpSettings(
                host=settings.smtp_host,
                port=settings.smtp_port,
                sender=settings.smtp_sender,
                username=settings.smtp_username,
                password=settings.smtp_password,
                starttls=settings.smtp_starttls,
            )
        ),
        "webhook": WebhookSender(sealer, webhooks),
    }
    worker = DeliveryWorker(
        platform.sessions,
        senders,
        RetryPolicy(max_attempts=settings.webhook_max_attempts, backoff_s=settings.webhook_backoff_s),
    )
    consumer = NotificationsConsumer(on_committed=worker.poke)
    readiness: list[tuple[str, Check]] = []
    if isinstance(fanout, RedisFanout):
        readiness.append(("notifications-fanout", fanout.check))
    return NotificationsComponent(
        hub=LiveHub(),
        fanout=fanout,
        sealer=sealer,
        worker=worker,
        webhooks=webhooks,
        consumers=[ConsumerSpec("notifications", (NOTIFICATIONS_OUTBOUND,), consumer)],
        readiness=readiness,
    )
