"""Reading notifications: what a reader may see, their backlog (unread, newest first, paged), marking
read, one notification with its deliveries, and the tenant's deliveries (the dead letters among them)."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, false, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.core.clock import utcnow
from somaagent.core.errors import InvalidRequest, NotFound
from somaagent.db.statements import insert_skipping_duplicates
from somaagent.notifications.consumer import CHANNELS
from somaagent.notifications.payloads import notification_json
from somaagent.notifications.tables import Delivery, Notification, NotificationRead

MAX_LIMIT = 200
DEFAULT_LIMIT = 50
DELIVERY_STATUSES = ("pending", "held", "sending", "sent", "dead", "cancelled")


@dataclass(frozen=True, slots=True)
class Reader:
    """Who reads: a tenant, a subject (`user:…`, `key:…`), the person if any, and whether they are one of
    the tenant's notification admins (who see `admins` notifications and every delivery)."""

    tenant_id: str
    subject: str
    user_id: str | None
    is_admin: bool


@dataclass(frozen=True, slots=True)
class Page:
    """One page, newest first; pass `next_after` as `after` for the next."""

    items: list[dict[str, Any]]
    has_more: bool
    next_after: str | None


def _visible(reader: Reader) -> ColumnElement[bool]:
    mine = (
        and_(Notification.audience == "user", Notification.user_id == reader.user_id)
        if reader.user_id is not None
        else false()
    )
    choices = [Notification.audience == "tenant", mine]
    if reader.is_admin:
        choices.append(Notification.audience == "admins")
    return and_(Notification.tenant_id == reader.tenant_id, or_(*choices))


def encode_after(created_at: datetime, item_id: str) -> str:
    """An opaque position in a newest-first listing."""
    raw = f"{created_at.astimezone(UTC).isoformat()}|{item_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_after(value: str) -> tuple[datetime, str]:
    """The position in `after`; 400 when it is not one this server issued."""
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
        when, _, item_id = raw.partition("|")
        at = datetime.fromisoformat(when)
        if not item_id or at.tzinfo is None:
            raise ValueError(value)
        at = at.astimezone(UTC)  # OverflowError for a moment UTC cannot hold (year 1 east of UTC)
    except (binascii.Error, UnicodeDecodeError, ValueError, OverflowError) as exc:
        raise InvalidRequest(
            f"`after` {value[:80]!r} is not a cursor; pass `next_after` from the previous page", param="after"
        ) from exc
    return at, item_id


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidRequest(f"`limit` must be between 1 and {MAX_LIMIT}, not {limit}", param="limit")


async def _statuses(
    session: AsyncSession, reader: Reader, ids: list[str]
) -> dict[str, tuple[str, datetime | None]]:
    """Per notification, how it stands for this reader: held (until when), delivered, or queued."""
    target_user = Delivery.user_id == reader.user_id if reader.user_id else Delivery.user_id.is_(None)
    rows = await session.execute(
        select(Delivery.notification_id, Delivery.status, Delivery.next_attempt_at).where(
            Delivery.tenant_id == reader.tenant_id,
            Delivery.notification_id.in_(ids),
            Delivery.channel != "webhook",
            target_user,
        )
    )
    found: dict[str, tuple[str, datetime | None]] = {}
    for notification_id, status, next_at in rows:
        current = found.get(notification_id)
        if status == "held":
            found[notification_id] = ("held", next_at)
        elif status == "sent" and (current is None or current[0] != "held"):
            found[notification_id] = ("delivered", None)
        elif current is None:
            found[notification_id] = ("queued", None)
    return found


async def backlog(
    session: AsyncSession, reader: Reader, limit: int = DEFAULT_LIMIT, after: str | None = None
) -> Page:
    """The reader's notifications (for them, their tenant, or its admins) not yet read, held ones
    included, newest first."""
    _check_limit(limit)
    read = select(NotificationRead.notification_id).where(
        NotificationRead.tenant_id == reader.tenant_id, NotificationRead.reader == reader.subject
    )
    query = (
        select(Notification)
        .where(_visible(reader), Notification.id.not_in(read))
        .order_by(Notification.created_at.desc(), Notification.id.desc())
        .limit(limit + 1)
    )
    if after is not None:
        at, last_id = decode_after(after)
        query = query.where(
            or_(Notification.created_at < at, and_(Notification.created_at == at, Notification.id < last_id))
        )
    rows = list((await session.scalars(query)).all())
    page, has_more = rows[:limit], len(rows) > limit
    states = await _statuses(session, reader, [r.id for r in page])
    items = []
    for row in page:
        status, held_until = states.get(row.id, ("queued", None))
        items.append(
            notification_json(row)
            | {"read": False, "status": status, "held_until": held_until.isoformat() if held_until else None}
        )
    next_after = encode_after(page[-1].created_at, page[-1].id) if has_more else None
    return Page(items, has_more, next_after)


async def visible_notification(session: AsyncSession, reader: Reader, notification_id: str) -> Notification:
    """A notification the reader may see (admins: any of their tenant's); 404 otherwise."""
    query = select(Notification).where(Notification.id == notification_id)
    if reader.is_admin:
        query = query.where(Notification.tenant_id == reader.tenant_id)
    else:
        query = query.where(_visible(reader))
    found = await session.scalar(query)
    if found is None:
        raise NotFound(f"no notification {notification_id!r}; list yours with GET /v1/notifications/backlog")
    return found


async def mark_read(session: AsyncSession, reader: Reader, notification_id: str) -> Notification:
    """Record that the reader has read it (again is a no-op); the caller commits."""
    found = await visible_notification(session, reader, notification_id)
    row = {
        "tenant_id": reader.tenant_id,
        "notification_id": found.id,
        "reader": reader.subject,
        "read_at": utcnow(),
    }
    await session.execute(
        insert_skipping_duplicates(session, NotificationRead, ["notification_id", "reader"]), [row]
    )
    return found


def delivery_json(row: Delivery) -> dict[str, Any]:
    """A delivery as the API shows it (an address is shown to admins only, who are the only readers)."""
    return {
        "id": row.id,
        "object": "notification.delivery",
        "notification_id": row.notification_id,
        "channel": row.channel,
        "user_id": row.user_id,
        "webhook_id": row.webhook_id,
        "address": row.address,
        "status": row.status,
        "attempts": row.attempts,
        "next_attempt_at": row.next_attempt_at.isoformat(),
        "last_error": row.last_error,
        "created_at": row.created_at.isoformat(),
        "sent_at": row.sent_at.isoformat() if row.sent_at else None,
    }


async def deliveries_of(session: AsyncSession, tenant_id: str, notification_id: str) -> list[dict[str, Any]]:
    """Every delivery of one of the tenant's notifications."""
    rows = await session.scalars(
        select(Delivery)
        .where(Delivery.tenant_id == tenant_id, Delivery.notification_id == notification_id)
        .order_by(Delivery.channel, Delivery.id)
    )
    return [delivery_json(r) for r in rows]


async def list_deliveries(
    session: AsyncSession,
    tenant_id: str,
    status: str | None,
    channel: str | None,
    limit: int = DEFAULT_LIMIT,
    after: str | None = None,
) -> Page:
    """The tenant's deliveries, newest first, filtered by status and channel."""
    _check_limit(limit)
    if status is not None and status not in DELIVERY_STATUSES:
        raise InvalidRequest(
            f"`status` must be one of {', '.join(DELIVERY_STATUSES)}, not {status!r}", param="status"
        )
    if channel is not None and channel not in CHANNELS:
        raise InvalidRequest(
            f"`channel` must be one of {', '.join(CHANNELS)}, not {channel!r}", param="channel"
        )
    query = (
        select(Delivery)
        .where(Delivery.tenant_id == tenant_id)
        .order_by(Delivery.created_at.desc(), Delivery.id.desc())
        .limit(limit + 1)
    )
    if status is not None:
        query = query.where(Delivery.status == status)
    if channel is not None:
        query = query.where(Delivery.channel == channel)
    if after is not None:
        at, last_id = decode_after(after)
        query = query.where(
            or_(Delivery.created_at < at, and_(Delivery.created_at == at, Delivery.id < last_id))
        )
    rows = list((await session.scalars(query)).all())
    page, has_more = rows[:limit], len(rows) > limit
    next_after = encode_after(page[-1].created_at, page[-1].id) if has_more else None
    return Page([delivery_json(r) for r in page], has_more, next_after)
