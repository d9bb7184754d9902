"""Policy tables: constitutions and rule sets (one immutable row per version), moderation strikes,
rate-limit and budget settings, budget counters and reservations, and the platform's price book."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from somaagent.db.base import Base, TenantMixin, UTCDateTime


class ConstitutionVersion(TenantMixin, Base):
    """One version of a tenant's constitution: the canonical document, its SHA-256 and the platform's
    Ed25519 signature over the canonical bytes. The highest version is in force."""

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
    """One version of a tenant's policy document (rules, threshold, fail mode, moderation, approvals,
    stream checking), as validated JSON. The highest version is in force."""

    __tablename__ = "policy_versions"

    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    document: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    created_by: Mapped[str] = mapped_column(String(255))


class ModerationStrike(TenantMixin, Base):
    """Denials of one subject counted in a window; at the threshold the subject is locked out until
    `locked_until`. Counted with conditional UPDATEs, so replicas share one count."""

    __tablename__ = "moderation_strikes"

    tenant_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    subject: Mapped[str] = mapped_column(String(255), primary_key=True)
    count: Mapped[int] = mapped_column(Integer)
    window_started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class RateLimitSetting(TenantMixin, Base):
    """Requests per minute, tokens per minute and concurrent requests for one scope of a tenant:
    the tenant itself (`scope_id` = tenant id), one user, or one API key. None: no limit there."""

    __tablename__ = "rate_limits"

    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id"), primary_key=True)
    scope: Mapped[str] = mapped_column(String(16), primary_key=True)  # tenant | user | key
    scope_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    concurrent: Mapped[int | None] = mapped_column(Integer, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Budget(TenantMixin, Base):
    """A spend limit on one scope (tenant, user or key) in tokens or in micro-USD, per period."""

    __tablename__ = "budgets"
    __table_args__ = (
        UniqueConstraint("tenant_id", "scope", "scope_id", "unit", "period", name="uq_budgets_scope"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id"), index=True)
    scope: Mapped[str] = mapped_column(String(16))  # tenant | user | key
    scope_id: Mapped[str] = mapped_column(String(40))
    unit: Mapped[str] = mapped_column(String(16))  # tokens | usd (stored in micro-USD)
    limit: Mapped[int] = mapped_column("limit_amount", BigInteger)
    period: Mapped[str] = mapped_column(String(16))  # day | month | total
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class BudgetCounter(Base):
    """What one budget has spent and holds reserved in one period (`period_start`; epoch for `total`)."""

    __tablename__ = "budget_counters"

    budget_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("budgets.id", ondelete="CASCADE"), primary_key=True
    )
    period_start: Mapped[datetime] = mapped_column(UTCDateTime(), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40))
    spent: Mapped[int] = mapped_column(BigInteger)
    reserved: Mapped[int] = mapped_column(BigInteger)


class BudgetReservation(TenantMixin, Base):
    """Amounts held on budget counters for one model call until it settles. A reservation whose process
    died is settled by the sweeper at its reserved (worst-case) amount: spend is never under-counted."""

    __tablename__ = "budget_reservations"
    __table_args__ = (Index("ix_budget_reservations_expires", "expires_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    # [{"budget_id", "period_start" (ISO), "amount"}]
    holds: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ModelPrice(Base):
    """One version of a price (platform-wide), in micro-USD: per million prompt, cached-prompt and
    completion tokens, plus a fixed price per call. Tools are priced as `tool:<name>` (per call only).
    A version is in force from `effective_from` until the next version's; versions never take effect
    before their predecessor, and each ledger entry names the version it was priced with."""

    __tablename__ = "model_prices"

    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_micros_per_mtok: Mapped[int] = mapped_column(BigInteger)
    completion_micros_per_mtok: Mapped[int] = mapped_column(BigInteger)
    cached_micros_per_mtok: Mapped[int] = mapped_column(BigInteger)
    call_micros: Mapped[int] = mapped_column(BigInteger)
    effective_from: Mapped[datetime] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    created_by: Mapped[str] = mapped_column(String(255))
