"""The outbox (events written in the same transaction as the state they describe) and the
`processed_events` marks that make every consumer group apply each event once."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from somaagent.db.base import Base, UTCDateTime


class OutboxEvent(Base):
    __tablename__ = "outbox"
    # Replay by time (`soma events replay --from`) reads a range of occurred_at.
    __table_args__ = (Index("ix_outbox_occurred_at", "occurred_at"),)

    # A database sequence gives the relay a total order to publish in.
    seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    id: Mapped[str] = mapped_column(String(40), unique=True)
    topic: Mapped[str] = mapped_column(String(64))
    type: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer, default=1)
    tenant_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    # A Principal.subject: "key:…", "user:…", or the longer "oidc:<trust id>:<IdP sub>".
    actor: Mapped[str | None] = mapped_column(String(255), nullable=True)
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime())
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)


class ProcessedEvent(Base):
    """One row per (consumer group, event) applied or dead-lettered; written in the same transaction as
    the handler's effects, so a redelivered event is recognised and skipped. Not tenant-owned: it is
    bookkeeping of the bus, keyed by globally unique event ids."""

    __tablename__ = "processed_events"

    group: Mapped[str] = mapped_column(String(64), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    processed_at: Mapped[datetime] = mapped_column(UTCDateTime())
