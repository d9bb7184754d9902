"""Documents in memory: upload (validated and extracted at once), list, get, delete — per tenant.

Owns the document's lifecycle `queued → processing → completed | failed`; `document_worker.py` moves
it along. Upload extracts and counts the chunks synchronously, so a bad document is refused with a 400
and nothing is stored. The extracted text waits in the document's row until it is indexed: the
database is crash-safe and shared by every worker process, with no second store to keep in step.
Every function filters on the caller's tenant: another tenant's document answers 404.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.core.clock import utcnow
from somaagent.core.errors import InvalidRequest, NotFound, PayloadTooLarge
from somaagent.core.ids import new_id
from somaagent.core.principal import Principal
from somaagent.memory.chunking import Chunk, TokenCounter, chunk_sections
from somaagent.memory.extraction import extract_text, sections_of
from somaagent.memory.service import Screen, bump_version, check_namespace
from somaagent.memory.tables import MemoryDocument, MemoryDocumentChunk, MemoryItem

QUEUED, PROCESSING, COMPLETED, FAILED = "queued", "processing", "completed", "failed"
RESERVED_METADATA = ("document_id", "document_name", "chunk", "section", "page")


@dataclass(frozen=True, slots=True)
class DocumentSettings:
    """Behaviour knobs (from `Settings`)."""

    chunk_tokens: int = 200
    overlap_tokens: int = 40
    max_bytes: int = 2 * 1024 * 1024
    batch: int = 32
    lease_s: float = 30.0
    poll_s: float = 1.0
    max_attempts: int = 3


@dataclass(frozen=True, slots=True)
class Upload:
    """A document as the caller sent it; `source` names the field the content came in (for errors)."""

    name: str
    media_type: str
    content: bytes
    namespace: str
    metadata: dict[str, Any]
    source: str


class DocumentIngest:
    """The request-path operations on documents."""

    def __init__(
        self, settings: DocumentSettings, count_tokens: TokenCounter, screen: Screen | None = None
    ) -> None:
        self.settings = settings
        self._count = count_tokens
        self._screen = screen  # the policy's check of a memory write, on the whole extracted text

    async def submit(
        self, session: AsyncSession, principal: Principal, upload: Upload, request_id: str
    ) -> MemoryDocument:
        """Validate, extract and count the chunks of a document, and queue it (the caller commits)."""
        check_namespace(upload.namespace)
        name = upload.name.strip()
        if not 0 < len(name) <= 255:
            raise InvalidRequest("name must be 1-255 characters", param="name")
        reserved = sorted(set(upload.metadata) & set(RESERVED_METADATA))
        if reserved:
            raise InvalidRequest(
                f"metadata keys {reserved} are reserved: every chunk gets {', '.join(RESERVED_METADATA)}",
                param="metadata",
            )
        limit = self.settings.max_bytes
        if len(upload.content) > limit:
            raise PayloadTooLarge(
                f"the document is {len(upload.content)} bytes, over the {limit} byte limit "
                "(SOMA_MEMORY_DOCUMENT_MAX_BYTES)",
                param=upload.source,
            )
        text, chunks = await asyncio.to_thread(self._read, upload)
        if not chunks:
            hint = (
                " (a scanned PDF has no text layer: OCR it first)"
                if upload.media_type.endswith("pdf")
                else ""
            )
            raise InvalidRequest(f"the document {name!r} has no text{hint}", param=upload.source)
        if self._screen is not None:
            await self._screen(principal, text, upload.namespace)
        now = utcnow()
        document = MemoryDocument(
            id=new_id("doc"),
            tenant_id=principal.tenant_id,
            namespace=upload.namespace,
            name=name,
            media_type=upload.media_type,
            meta=dict(upload.metadata),
            size_bytes=len(upload.content),
            text=text,
            status=QUEUED,
            chunks_total=len(chunks),
            chunks_done=0,
            chunk_tokens=self.settings.chunk_tokens,
            overlap_tokens=self.settings.overlap_tokens,
            subject=principal.subject,
            key_id=principal.key_id,
            tenant_name=principal.tenant_name,
            is_admin=principal.is_admin,
            request_id=request_id[:64],
            attempts=0,
            created_at=now,
            updated_at=now,
        )
        session.add(document)
        await session.flush()
        return document

    def _read(self, upload: Upload) -> tuple[str, list[Chunk]]:
        text = extract_text(upload.content, upload.media_type, upload.source)
        budget, overlap = self.settings.chunk_tokens, self.settings.overlap_tokens
        return text, chunk_sections(sections_of(text, upload.media_type), budget, overlap, self._count)

    async def get(self, session: AsyncSession, principal: Principal, document_id: str) -> MemoryDocument:
        """One document of the caller's tenant."""
        document = await session.scalar(
            select(MemoryDocument).where(
                MemoryDocument.id == document_id, MemoryDocument.tenant_id == principal.tenant_id
            )
        )
        if document is None:
            raise NotFound(f"no document {document_id!r}", param="id")
        return document

    async def list_documents(
        self, session: AsyncSession, principal: Principal, namespace: str, limit: int, after: str | None
    ) -> list[MemoryDocument]:
        """Documents of a namespace, oldest first, `limit` at a time after the id `after`."""
        check_namespace(namespace)
        query = (
            select(MemoryDocument)
            .where(MemoryDocument.tenant_id == principal.tenant_id, MemoryDocument.namespace == namespace)
            .order_by(MemoryDocument.id)
            .limit(limit)
        )
        if after is not None:
            query = query.where(MemoryDocument.id > after)
        return list((await session.scalars(query)).all())

    async def delete(
        self, session: AsyncSession, principal: Principal, document_id: str
    ) -> tuple[MemoryDocument, int]:
        """Delete a document and its chunk memories (indexes drop them on their next sync); the caller
        commits. Returns the document and how many memories went with it."""
        # Lock the row first: a worker's batch commits only while it can update this row, so after this
        # statement no chunk of the document can appear that the deletion below would miss.
        locked = await session.execute(
            update(MemoryDocument)
            .where(MemoryDocument.id == document_id, MemoryDocument.tenant_id == principal.tenant_id)
            .values(updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        if not locked.rowcount:  # type: ignore[attr-defined]
            raise NotFound(f"no document {document_id!r}", param="id")
        document = await self.get(session, principal, document_id)
        removed = await remove_chunks(session, document)
        await session.execute(delete(MemoryDocument).where(MemoryDocument.id == document.id))
        return document, removed


async def remove_chunks(session: AsyncSession, document: MemoryDocument) -> int:
    """Soft-delete a document's chunk memories under one new namespace version, and its chunk map."""
    of_document = select(MemoryDocumentChunk.memory_id).where(
        MemoryDocumentChunk.tenant_id == document.tenant_id, MemoryDocumentChunk.document_id == document.id
    )
    count = int(await session.scalar(select(func.count()).select_from(of_document.subquery())) or 0)
    if count:
        version = await bump_version(session, document.tenant_id, document.namespace)
        await session.execute(
            update(MemoryItem)
            .where(
                MemoryItem.tenant_id == document.tenant_id,
                MemoryItem.id.in_(of_document),
                MemoryItem.deleted_at.is_(None),
            )
            .values(deleted_at=utcnow(), version=version)
            .execution_options(synchronize_session=False)
        )
        await session.execute(
            delete(MemoryDocumentChunk).where(
                MemoryDocumentChunk.tenant_id == document.tenant_id,
                MemoryDocumentChunk.document_id == document.id,
            )
        )
    return count


__all__ = [
    "COMPLETED",
    "FAILED",
    "PROCESSING",
    "QUEUED",
    "RESERVED_METADATA",
    "DocumentIngest",
    "DocumentSettings",
    "Upload",
    "remove_chunks",
]
