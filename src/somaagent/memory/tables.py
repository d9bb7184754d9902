"""Memory tables: each memory's text, metadata and embedding (the source of truth every vector
index is rebuilt from), a per-namespace version that orders changes for index sync, and the documents
being ingested into memories with their chunk map."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Index, Integer, LargeBinary, String, Text
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


class MemoryDocument(TenantMixin, Base):
    """A document being (or done being) chunked into memories of one namespace.

    `text` holds the extracted text from upload until the document is indexed: in the database it is
    crash-safe and visible to every worker process, with no second store to keep in step. It is emptied
    when the document completes (the chunks are the content from then on).
    """

    __tablename__ = "memory_documents"
    __table_args__ = (
        Index("ix_memory_documents_tenant_ns_id", "tenant_id", "namespace", "id"),
        Index("ix_memory_documents_status_lease", "status", "lease_expires_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    namespace: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(255))
    media_type: Mapped[str] = mapped_column(String(64))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    text: Mapped[str] = mapped_column(Text, deferred=True)  # loaded only by the worker that claims it
    # queued → processing → completed | failed
    status: Mapped[str] = mapped_column(String(16))
    chunks_total: Mapped[int] = mapped_column(Integer)
    chunks_done: Mapped[int] = mapped_column(Integer, default=0)
    # The chunking the document was counted with at upload; processing chunks it the same way.
    chunk_tokens: Mapped[int] = mapped_column(Integer)
    overlap_tokens: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Who uploaded it: the background job embeds and meters as them.
    subject: Mapped[str] = mapped_column(String(128))
    key_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    tenant_name: Mapped[str] = mapped_column(String(128))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    request_id: Mapped[str] = mapped_column(String(64))
    # The worker process holding the document, until `lease_expires_at` (renewed by its heartbeat).
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class MemoryDocumentChunk(TenantMixin, Base):
    """Which memory holds chunk N of a document. The primary key makes a chunk impossible to write
    twice, whatever happens to leases; deleting a document finds its memories here."""

    __tablename__ = "memory_document_chunks"

    document_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    chunk: Mapped[int] = mapped_column(Integer, primary_key=True)
    memory_id: Mapped[str] = mapped_column(String(40))
