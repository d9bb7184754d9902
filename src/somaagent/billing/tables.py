"""Billing tables: the append-only ledger (one row per billable event or correction) and its hourly and
daily rollups, which every total is read from."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from somaagent.db.base import Base, TenantMixin, UTCDateTime


class LedgerEntry(TenantMixin, Base):
    """One billable fact, never updated or deleted (triggers refuse it): a model call, a tool call, or a
    correction of an earlier entry (a new row with a signed amount). Keyed by the source event's id, so a
    redelivered event adds nothing."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        Index("ix_ledger_entries_tenant_time", "tenant_id", "occurred_at", "id"),
        Index("ix_ledger_entries_tenant_kind_time", "tenant_id", "kind", "occurred_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    # The `model.usage` / `tool.calls` event billed, or a correction's idempotency id.
    source_event_id: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    request_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime())
    kind: Mapped[str] = mapped_column(String(16))  # model | tool | correction
    item: Mapped[str] = mapped_column(String(160))  # the model id or tool name
    status: Mapped[str] = mapped_column(String(64))  # "ok" or the call's error code
    key_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    subject: Mapped[str | None] = mapped_column(String(255), nullable=True)
    user_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)
    cached_tokens: Mapped[int] = mapped_column(BigInteger)
    quantity: Mapped[int] = mapped_column(BigInteger)  # calls billed (0 for a correction)
    amount_micros: Mapped[int] = mapped_column(BigInteger)  # signed for corrections
    priced: Mapped[bool] = mapped_column(Boolean)
    price_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    corrects: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    reason: Mapped[str | None] = mapped_column(String(500), nullable=True)
    recorded_by: Mapped[str | None] = mapped_column(String(255), nullable=True)  # who posted a correction
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime())


class BillingRollup(TenantMixin, Base):
    """Totals of ledger entries per bucket (`hour` or `day`, by its UTC start) and dimensions, kept in the
    transaction that appends the entries. Absent dimensions are '' (so the key is a plain primary key)."""

    __tablename__ = "billing_rollups"

    tenant_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    period: Mapped[str] = mapped_column(String(8), primary_key=True)  # hour | day
    bucket: Mapped[datetime] = mapped_column(UTCDateTime(), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    item: Mapped[str] = mapped_column(String(160), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    subject: Mapped[str] = mapped_column(String(255), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    entries: Mapped[int] = mapped_column(BigInteger)  # ledger rows, corrections included
    requests: Mapped[int] = mapped_column(BigInteger)  # calls billed (the entries' quantity)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)
    cached_tokens: Mapped[int] = mapped_column(BigInteger)
    amount_micros: Mapped[int] = mapped_column(BigInteger)
