"""Queueing a notification by hand (`POST /v1/notifications`): the request checked, then staged as the
same `notification.requested` event every other producer stages, in the caller's transaction."""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.core.errors import InvalidRequest
from somaagent.events.notices import SEVERITIES, Severity, notification_event
from somaagent.events.outbox import add_event
from somaagent.events.schemas import Event
from somaagent.notifications.consumer import CHANNELS
from somaagent.notifications.recipients import require_user

MAX_MESSAGE = 4000
MAX_METADATA_BYTES = 16 * 1024


def _severity(value: str) -> Severity:
    for severity in SEVERITIES:
        if value == severity:
            return severity
    raise InvalidRequest(
        f"`severity` must be one of {', '.join(SEVERITIES)}, not {value[:40]!r}", param="severity"
    )


async def queue_notification(
    session: AsyncSession,
    tenant_id: str,
    actor: str,
    *,
    severity: str,
    message: str,
    channel: str | None = None,
    metadata: Any = None,
    user_id: str | None = None,
) -> Event:
    """Check a manual notification and stage its event (the caller commits); 400/404 name the param."""
    level = _severity(severity)
    if channel is not None and channel not in CHANNELS:
        raise InvalidRequest(
            f"`channel` must be one of {', '.join(CHANNELS)} (or null: each person's preferences decide), "
            f"not {channel[:40]!r}",
            param="channel",
        )
    if not message.strip():
        raise InvalidRequest("`message` must not be empty", param="message")
    if len(message) > MAX_MESSAGE:
        raise InvalidRequest(
            f"`message` is {len(message)} characters; at most {MAX_MESSAGE} are allowed", param="message"
        )
    if metadata is not None and not isinstance(metadata, dict):
        raise InvalidRequest("`metadata` must be a JSON object", param="metadata")
    if metadata is not None and len(orjson.dumps(metadata)) > MAX_METADATA_BYTES:
        raise InvalidRequest(
            f"`metadata` is larger than {MAX_METADATA_BYTES // 1024} KB once encoded as JSON",
            param="metadata",
        )
    if user_id is not None:
        await require_user(session, tenant_id, user_id)
    event = notification_event(
        tenant_id,
        kind="manual",
        severity=level,
        message=message,
        audience="user" if user_id is not None else "tenant",
        user_id=user_id,
        channel=channel,
        metadata=metadata,
        actor=actor,
    )
    add_event(session, event)
    return event
