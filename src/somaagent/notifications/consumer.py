"""The `notifications.outbound` consumer: each `notification.requested` event becomes a notification row
and one delivery per (recipient, channel), chosen from the audience, each recipient's preferences and
the tenant's webhooks. Idempotent: the notification is keyed by its id, each delivery by (notification,
target), and both are inserted skipping duplicates."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import event as orm_event
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from somaagent.core.clock import utcnow
from somaagent.db.statements import insert_skipping_duplicates
from somaagent.events.notices import SEVERITIES
from somaagent.events.schemas import Event
from somaagent.notifications.preferences import email_of, preferences_of, severity_rank
from somaagent.notifications.recipients import Recipient, audience_of
from somaagent.notifications.tables import Delivery, Notification, Webhook

REQUESTED = "notification.requested"
CHANNELS = ("websocket", "email", "webhook")
AUDIENCES = ("user", "admins", "tenant")
TENANT_SOCKETS = "tenant"  # the target of a delivery to the tenant's sockets that are not a person's


def delivery_id(notification_id: str, channel: str, target: str) -> str:
    """The same id for the same (notification, channel, target): replays insert nothing new."""
    digest = hashlib.sha256(f"{notification_id}\x00{channel}\x00{target}".encode()).hexdigest()
    return f"dlv_{digest[:32]}"


def _notification_row(event: Event) -> dict[str, Any]:
    data = event.data
    if event.tenant_id is None:
        raise ValueError(f"notification event {event.id} has no tenant")
    severity, audience, channel = data.get("severity"), data.get("audience"), data.get("channel")
    if severity not in SEVERITIES or audience not in AUDIENCES or channel not in (None, *CHANNELS):
        raise ValueError(f"notification event {event.id}: bad severity/audience/channel")
    if not isinstance(data.get("notification_id"), str) or not isinstance(data.get("message"), str):
        raise ValueError(f"notification event {event.id}: notification_id and message must be strings")
    return {
        "id": data["notification_id"],
        "tenant_id": event.tenant_id,
        "event_id": event.id,
        "kind": str(data.get("kind") or "manual")[:64],
        "severity": severity,
        "message": data["message"],
        "audience": audience,
        "user_id": data.get("user_id"),
        "channel": channel,
        "details": data.get("metadata") or {},
        "actor": event.actor,
        "created_at": event.occurred_at,
    }


def _delivery(
    row: dict[str, Any], channel: str, target: str, now: datetime, *, hold_until: datetime | None = None
) -> dict[str, Any]:
    return {
        "id": delivery_id(row["id"], channel, target),
        "tenant_id": row["tenant_id"],
        "notification_id": row["id"],
        "channel": channel,
        "user_id": None,
        "webhook_id": None,
        "address": None,
        "status": "held" if hold_until is not None else "pending",
        "attempts": 0,
        "next_attempt_at": hold_until or now,
        "last_error": None,
        "created_at": now,
        "updated_at": now,
        "sent_at": None,
    }


async def plan_deliveries(
    session: AsyncSession, row: dict[str, Any], webhooks: list[Webhook], now: datetime
) -> list[dict[str, Any]]:
    """The deliveries one new notification needs."""
    tenant_id, severity, channel = row["tenant_id"], row["severity"], row["channel"]
    rank = severity_rank(severity)
    planned: list[dict[str, Any]] = []
    if channel in (None, "websocket", "email"):
        people: list[Recipient] = await audience_of(session, tenant_id, row["audience"], row["user_id"])
        chosen = await preferences_of(session, tenant_id, [p.user_id for p in people])
        for person in people:
            preferences = chosen[person.user_id]
            if rank < severity_rank(preferences.min_severity):
                continue
            # Critical never waits for the end of anyone's quiet hours.
            hold = (
                None
                if severity == "critical" or preferences.quiet is None
                else preferences.quiet.release_at(now)
            )
            for medium in preferences.channels if channel is None else (channel,):
                address = email_of(preferences, person.username) if medium == "email" else None
                if medium == "email" and address is None:
                    continue
                delivery = _delivery(row, medium, f"user:{person.user_id}", now, hold_until=hold)
                delivery.update(user_id=person.user_id, address=address)
                planned.append(delivery)
        if channel in (None, "websocket") and row["audience"] != "user":
            # Sockets opened with an API key belong to no person: they follow the tenant's stream.
            planned.append(_delivery(row, "websocket", TENANT_SOCKETS, now))
    if channel in (None, "webhook"):
        for webhook in webhooks:
            if rank >= severity_rank(webhook.min_severity):
                delivery = _delivery(row, "webhook", f"webhook:{webhook.id}", now)
                delivery["webhook_id"] = webhook.id
                planned.append(delivery)
    return planned


class NotificationsConsumer:
    """The handler of group `notifications`. `on_committed` runs after the runner commits a batch that
    planned deliveries (it wakes the delivery worker)."""

    def __init__(self, on_committed: Callable[[], None]) -> None:
        self._on_committed = on_committed

    async def __call__(self, session: AsyncSession, events: Sequence[Event]) -> None:
        """Record each requested notification and plan its deliveries, in the runner's transaction."""
        rows = [_notification_row(e) for e in events if e.type == REQUESTED]
        if not rows:
            return
        ids = [r["id"] for r in rows]
        seen = set((await session.scalars(select(Notification.id).where(Notification.id.in_(ids)))).all())
        fresh: dict[str, dict[str, Any]] = {}
        for row in rows:  # a batch may repeat a deduplicated id: the first one wins
            if row["id"] not in seen and row["id"] not in fresh:
                fresh[row["id"]] = row
        if not fresh:
            return
        await session.execute(insert_skipping_duplicates(session, Notification, ["id"]), list(fresh.values()))
        now = utcnow()
        webhooks_of: dict[str, list[Webhook]] = {}
        deliveries: list[dict[str, Any]] = []
        for row in fresh.values():
            tenant_id = row["tenant_id"]
            if tenant_id not in webhooks_of:
                found = await session.scalars(select(Webhook).where(Webhook.tenant_id == tenant_id))
                webhooks_of[tenant_id] = list(found.all())
            deliveries.extend(await plan_deliveries(session, row, webhooks_of[tenant_id], now))
        if deliveries:
            await session.execute(insert_skipping_duplicates(session, Delivery, ["id"]), deliveries)
            orm_event.listen(session.sync_session, "after_commit", self._committed, once=True)

    def _committed(self, _session: Session) -> None:
        self._on_committed()
