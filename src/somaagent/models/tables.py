"""Per-tenant model profiles: a role (`chat`, `planning`, `code`, `embedding`) → an ordered model list."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, String
from sqlalchemy.orm import Mapped, mapped_column

from somaagent.db.base import Base, TenantMixin, UTCDateTime


class ModelProfile(TenantMixin, Base):
    __tablename__ = "model_profiles"

    tenant_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    role: Mapped[str] = mapped_column(String(32), primary_key=True)
    # Tried in order: an upstream error or timeout falls through to the next.
    models: Mapped[list[str]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
