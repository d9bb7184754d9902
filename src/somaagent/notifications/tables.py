"""Notifications tables: what was asked for (`notifications`), each (recipient, channel) it goes to
(`notification_deliveries`), who has read what, per-user preferences and the tenant's webhooks."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from somaagent.db.base import Base, TenantMixin, UTCDateTime


class Notification(TenantMixin, Base):
    """One `notification.requested` event, keyed by its `notification_id` (a deduplicated request
    arrives once however many producers or deliveries repeat it)."""

    __tablename__ = "notifications"
    __table_args__ = (Index("ix_notifications_tenant_time", "tenant_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(40))  # the event that asked for it: `x-soma-event-id`
    kind: Mapped[str] = mapped_column(String(64))  # "manual", "budget.80", "anomaly.spend", …
    severity: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    audience: Mapped[str] = mapped_column(String(16))  # user | admins | tenant
    user_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    channel: Mapped[str | None] = mapped_column(String(16), nullable=True)  # null: preferences decide
    # `metadata` is reserved on declarative classes.
    details: Mapped[dict[str, Any]] = mapped_column("metadata", JSON)
    actor: Mapped[str | None] = mapped_column(String(255), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Delivery(TenantMixin, Base):
    """One notification to one target on one channel: a user's sockets, a user's email address, the
    tenant's key sockets, or a webhook. Its id is derived from (notification, target), so replaying the
    event adds nothing. Status: pending → sending → sent, or held (quiet hours) → pending, or dead after
    the last failed attempt, or cancelled (its webhook was deleted)."""

    __tablename__ = "notification_deliveries"
    __table_args__ = (
        Index("ix_notification_deliveries_due", "status", "next_attempt_at"),
        Index("ix_notification_deliveries_tenant_status", "tenant_id", "status", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    notification_id: Mapped[str] = mapped_column(String(40), index=True)
    channel: Mapped[str] = mapped_column(String(16))  # websocket | email | webhook
    user_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    webhook_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    address: Mapped[str | None] = mapped_column(String(320), nullable=True)  # the email recipient
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # When it is next due: now, the end of the quiet hours, a retry's backoff, or a claim's lease.
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class NotificationRead(TenantMixin, Base):
    """A reader (a `Principal.subject`: a user or a key) has read a notification."""

    __tablename__ = "notification_reads"

    notification_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    reader: Mapped[str] = mapped_column(String(255), primary_key=True)
    read_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Preference(TenantMixin, Base):
    """A user's choices; a user without a row gets the defaults (`preferences.DEFAULT`)."""

    __tablename__ = "notification_preferences"

    tenant_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    channels: Mapped[list[str]] = mapped_column(JSON)
    min_severity: Mapped[str] = mapped_column(String(16))
    email: Mapped[str | None] = mapped_column(String(320), nullable=True)
    quiet_start: Mapped[str | None] = mapped_column(String(8), nullable=True)  # "22:00" local time
    quiet_end: Mapped[str | None] = mapped_column(String(8), nullable=True)
    time_zone: Mapped[str | None] = mapped_column(String(64), nullable=True)  # IANA
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Webhook(TenantMixin, Base):
    """An endpoint that receives the tenant's notifications at or above `min_severity`, signed with a
    secret stored sealed (never in plain text)."""

    __tablename__ = "notification_webhooks"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    url: Mapped[str] = mapped_column(String(2048))
    min_severity: Mapped[str] = mapped_column(String(16))
    sealed_secret: Mapped[str] = mapped_column(Text)
    created_by: Mapped[str | None] = mapped_column(String(255), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
