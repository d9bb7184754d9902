"""API schemas for memories."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from somaagent.memory.rag import Passage
from somaagent.memory.service import DEFAULT_NAMESPACE, Recalled
from somaagent.memory.tables import MemoryItem


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
