"""Asking for a notification: every producer (approvals, budgets, anomalies, security) stages one
`notifications.outbound` event; the notifications consumer decides who gets it, on which channel, when."""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from somaagent.core.ids import new_id
from somaagent.events.schemas import NOTIFICATIONS_OUTBOUND, Event

Severity = Literal["info", "warning", "error", "critical"]
SEVERITIES: tuple[Severity, ...] = ("info", "warning", "error", "critical")  # lowest first
# Who a notification is for: one user, the tenant's admins (users who hold the capability the kind
# needs), or everyone in the tenant.
Audience = Literal["user", "admins", "tenant"]


def notification_id(tenant_id: str, dedupe_key: str | None) -> str:
    """A fresh id, or the same id for the same `dedupe_key` in a tenant (a budget crossing 80 % is told
    once per period, however many replicas see it)."""
    if dedupe_key is None:
        return new_id("ntf")
    digest = hashlib.sha256(f"{tenant_id}\x00{dedupe_key}".encode()).hexdigest()
    return f"ntf_{digest[:32]}"


def notification_event(
    tenant_id: str,
    *,
    kind: str,
    severity: Severity,
    message: str,
    audience: Audience = "admins",
    user_id: str | None = None,
    channel: str | None = None,
    metadata: dict[str, Any] | None = None,
    dedupe_key: str | None = None,
    actor: str | None = None,
) -> Event:
    """The `notification.requested` event. `channel` None lets each recipient's preferences choose."""
    if audience == "user" and user_id is None:
        raise ValueError("a notification for one user needs its user_id")
    return Event(
        topic=NOTIFICATIONS_OUTBOUND,
        type="notification.requested",
        tenant_id=tenant_id,
        actor=actor,
        data={
            "notification_id": notification_id(tenant_id, dedupe_key),
            "kind": kind,
            "severity": severity,
            "message": message,
            "audience": audience,
            "user_id": user_id,
            "channel": channel,
            "metadata": metadata or {},
        },
    )
