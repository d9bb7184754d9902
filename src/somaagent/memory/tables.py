"""Memory tables: each memory's text, metadata and embedding (the source of truth every vector
index is rebuilt from), and a per-namespace version that orders changes for index sync."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from somaagent.db.base import Base, TenantMixin, UTCDateTime


class MemoryItem(TenantMixin, Base):
    __tablename__ = "memories"
    __table_args__ = (
        Index("ix_memories_tenant_ns_version", "tenant_id", "namespace", "version"),
        Index("ix_memories_tenant_ns_created", "tenant_id", "namespace", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    # The integer key of this memory in the vector indexes (random, < 2**63, unique).
    key: Mapped[int] = mapped_column(BigInteger, unique=True)
    namespace: Mapped[str] = mapped_column(String(128))
    text: Mapped[str] = mapped_column(Text)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON)
    # float32 little-endian bytes of the unit vector, and the model that made it.
    embedding: Mapped[bytes] = mapped_column(LargeBinary)
    model: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Soft delete: the row stays (with a new version) until its removal reached every index.
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class MemoryNamespace(TenantMixin, Base):
    """The change counter of one namespace. Writers bump it under the row's lock, so versions commit
    in order and an index that has applied version N has seen every change up to N."""

    __tablename__ = "memory_namespaces"

    tenant_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    namespace: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, default=0)
