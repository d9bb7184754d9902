"""Policy tables: each tenant's constitution and rule set, one immutable row per version."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from somaagent.db.base import Base, TenantMixin, UTCDateTime


class ConstitutionVersion(TenantMixin, Base):
    """One version of a tenant's constitution: the canonical document, its SHA-256 and the platform's
    Ed25519 signature over that digest. The highest version is in force."""

    __tablename__ = "constitutions"

    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    document: Mapped[dict[str, Any]] = mapped_column(JSON)
    sha256: Mapped[str] = mapped_column(String(64))  # hex of SHA-256(canonical JSON of `document`)
    signature: Mapped[str] = mapped_column(String(128))  # base64url Ed25519 over the canonical bytes
    signing_key_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    created_by: Mapped[str] = mapped_column(String(255))


class PolicyVersion(TenantMixin, Base):
    """One version of a tenant's rule set (the rules as validated JSON). The highest version is in force."""

    __tablename__ = "policy_versions"

    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    rules: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    # When evaluating fails (a broken rule, a timeout), deny (True) or allow (False).
    fail_closed: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    created_by: Mapped[str] = mapped_column(String(255))
