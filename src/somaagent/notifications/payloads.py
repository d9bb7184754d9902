"""The JSON form of a notification: the same in the API, on the socket, in webhook bodies and emails."""

from __future__ import annotations

from typing import Any

from somaagent.notifications.tables import Notification


def notification_json(row: Notification) -> dict[str, Any]:
    """`{id, object, tenant_id, kind, severity, message, audience, user_id, channel, metadata,
    created_at}`."""
    return {
        "id": row.id,
        "object": "notification",
        "tenant_id": row.tenant_id,
        "kind": row.kind,
        "severity": row.severity,
        "message": row.message,
        "audience": row.audience,
        "user_id": row.user_id,
        "channel": row.channel,
        "metadata": row.details,
        "created_at": row.created_at.isoformat(),
    }
