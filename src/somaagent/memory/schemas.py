"""API schemas for memories and documents."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from somaagent.memory.rag import Passage
from somaagent.memory.service import DEFAULT_NAMESPACE, Recalled
from somaagent.memory.tables import MemoryDocument, MemoryItem


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RememberIn(_Strict):
    text: str = Field(min_length=1, max_length=32_000)
    metadata: dict[str, Any] = Field(default_factory=dict)
    namespace: str = DEFAULT_NAMESPACE
    ttl_seconds: float | None = Field(default=None, gt=0, description="Forget after this many seconds.")


class RecallIn(_Strict):
    query: str = Field(min_length=1, max_length=8_000)
    top_k: int = Field(default=5, ge=1, le=100)
    namespace: str = DEFAULT_NAMESPACE
    filter: dict[str, Any] = Field(
        default_factory=dict, description="Metadata equality; a list means any of."
    )
    min_score: float | None = Field(default=None, ge=-1, le=1)


class MemoryOut(BaseModel):
    object: Literal["memory"] = "memory"
    id: str
    namespace: str
    text: str
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None

    @classmethod
    def of(cls, item: MemoryItem) -> MemoryOut:
        return cls(
            id=item.id,
            namespace=item.namespace,
            text=item.text,
            metadata=item.meta,
            created_at=item.created_at,
            updated_at=item.updated_at,
            expires_at=item.expires_at,
        )


class RememberedOut(MemoryOut):
    merged: bool = Field(description="True when a near-duplicate was updated instead of a memory added.")


class RecalledOut(MemoryOut):
    similarity: float
    score: float = Field(description="Similarity blended with recency; see README 'Memory'.")

    @classmethod
    def of_recalled(cls, recalled: Recalled) -> RecalledOut:
        base = MemoryOut.of(recalled.item).model_dump()
        return cls(**base, similarity=round(recalled.similarity, 6), score=round(recalled.score, 6))


class RecallOut(BaseModel):
    object: Literal["list"] = "list"
    data: list[RecalledOut]


class PassageOut(BaseModel):
    n: int
    memory_id: str
    text: str
    score: float

    @classmethod
    def of(cls, passage: Passage) -> PassageOut:
        return cls(n=passage.n, memory_id=passage.memory_id, text=passage.text, score=passage.score)


class RagOut(BaseModel):
    object: Literal["rag.context"] = "rag.context"
    query: str
    context: str = Field(
        description="Prompt-ready: a preamble and `[n] passage` lines; empty when nothing matched."
    )
    passages: list[PassageOut]


class MemoryListOut(BaseModel):
    object: Literal["list"] = "list"
    data: list[MemoryOut]
    has_more: bool


DocumentStatus = Literal["queued", "processing", "completed", "failed"]


class DocumentIn(_Strict):
    name: str = Field(min_length=1, max_length=255, description="A name to show, e.g. the file name.")
    media_type: Literal["text/plain", "text/markdown", "application/pdf"]
    text: str | None = Field(default=None, description="The document itself (text/plain or text/markdown).")
    content_base64: str | None = Field(
        default=None, description="The document's bytes in base64 (any media type; needed for PDF)."
    )
    namespace: str = DEFAULT_NAMESPACE
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="Copied onto every chunk's metadata, beside document_id/chunk."
    )


class DocumentOut(BaseModel):
    object: Literal["memory.document"] = "memory.document"
    id: str
    name: str
    namespace: str
    media_type: str
    metadata: dict[str, Any]
    size_bytes: int
    status: DocumentStatus = Field(description="queued → processing → completed | failed")
    chunks_total: int
    chunks_done: int = Field(description="Chunks embedded and stored (searchable) so far.")
    error: str | None = Field(description="Why the document failed, when it did.")
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None

    @classmethod
    def of(cls, document: MemoryDocument) -> DocumentOut:
        return cls(
            id=document.id,
            name=document.name,
            namespace=document.namespace,
            media_type=document.media_type,
            metadata=document.meta,
            size_bytes=document.size_bytes,
            status=document.status,
            chunks_total=document.chunks_total,
            chunks_done=document.chunks_done,
            error=document.error,
            created_at=document.created_at,
            updated_at=document.updated_at,
            completed_at=document.completed_at,
        )


class DocumentDeletedOut(DocumentOut):
    deleted: Literal[True] = True
    chunks_deleted: int = Field(description="Chunk memories deleted with the document.")


class DocumentListOut(BaseModel):
    object: Literal["list"] = "list"
    data: list[DocumentOut]
    has_more: bool
