"""The audit log: one row per `audit.events` event, never updated or deleted (a trigger refuses it)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from somaagent.db.base import Base, UTCDateTime


class AuditRecord(Base):
    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_tenant_time", "tenant_id", "occurred_at", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # the event id: consuming is idempotent
    # Null for operator actions outside any tenant.
    tenant_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    type: Mapped[str] = mapped_column(String(64), index=True)
    actor: Mapped[str | None] = mapped_column(String(255), nullable=True)
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime())
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
