"""Remember, recall, RAG, list, delete and export memories — per tenant and namespace.

Every function takes the caller's `Principal` and filters on its tenant: a memory of another tenant
is never searched, returned or changed (its id answers 404, like one that does not exist).
"""

from __future__ import annotations

import random
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.core.clock import utcnow
from somaagent.core.errors import InvalidRequest, NotFound
from somaagent.core.ids import new_id
from somaagent.core.principal import Principal
from somaagent.db.statements import insert_skipping_duplicates
from somaagent.memory.indexes import SyncedIndexes
from somaagent.memory.ranking import Ranking
from somaagent.memory.tables import MemoryItem, MemoryNamespace
from somaagent.models.messages import Embeddings

NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9:_.@-]{0,127}$")
DEFAULT_NAMESPACE = "default"
# (principal, texts) → embeddings; the API passes the model router so usage is the caller's.
Embed = Callable[[Principal, list[str]], Awaitable[Embeddings]]
# The policy's check before a memory write: (principal, text, namespace); raises to refuse the write.
Screen = Callable[[Principal, str, str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Recalled:
    """A memory found for a query, with its similarity and ranked score."""

    item: MemoryItem
    similarity: float
    score: float


@dataclass(frozen=True, slots=True)
class Remembered:
    """A stored memory; `merged` when it updated a near-duplicate instead of adding one."""

    item: MemoryItem
    merged: bool
    tokens: int


@dataclass
class MemorySettings:
    """Behaviour knobs (from `Settings`)."""

    duplicate_threshold: float = 0.95
    ranking: Ranking = field(default_factory=Ranking)
    candidates_factor: int = 4


def check_namespace(namespace: str) -> str:
    """A valid namespace, or InvalidRequest naming the rule."""
    if not NAMESPACE.match(namespace):
        raise InvalidRequest(
            f"invalid namespace {namespace!r}: 1-128 characters, letters, digits and ':_.@-', "
            "starting with a letter or digit (e.g. 'default', 'user:alice')",
            param="namespace",
        )
    return namespace


class MemoryService:
    """The memory operations; stateless apart from the process-local index cache."""

    def __init__(
        self, embed: Embed, indexes: SyncedIndexes, settings: MemorySettings, screen: Screen | None = None
    ) -> None:
        self._embed = embed
        self._indexes = indexes
        self._settings = settings
        self._screen = screen

    async def remember(
        self,
        session: AsyncSession,
        principal: Principal,
        text: str,
        metadata: dict[str, Any],
        namespace: str,
        ttl_s: float | None,
    ) -> Remembered:
        """Store `text`, or merge it into a near-duplicate (cosine ≥ the threshold) of the same namespace."""
        check_namespace(namespace)
        if self._screen is not None:
            await self._screen(principal, text, namespace)
        embedded = await self._embed(principal, [text])
        vector = np.asarray(embedded.vectors[0], dtype=np.float32)
        now = utcnow()
        expires = now + timedelta(seconds=ttl_s) if ttl_s is not None else None
        hits = await self._indexes.search(session, principal.tenant_id, namespace, vector, 1)
        duplicate = None
        if hits and hits[0].score >= self._settings.duplicate_threshold:
            duplicate = await self._live_by_key(session, principal.tenant_id, namespace, hits[0].id, now)
        version = await bump_version(session, principal.tenant_id, namespace)
        if duplicate is not None:
            # Newer wording wins; metadata keys are merged, the new value winning on conflict.
            duplicate.text = text
            duplicate.meta = {**duplicate.meta, **metadata}
            duplicate.embedding = vector.astype("<f4").tobytes()
            duplicate.model = embedded.model
            duplicate.version = version
            duplicate.updated_at = now
            duplicate.expires_at = expires
            await session.flush()
            return Remembered(duplicate, merged=True, tokens=embedded.prompt_tokens)
        item = MemoryItem(
            id=new_id("mem"),
            key=random.getrandbits(62),
            tenant_id=principal.tenant_id,
            namespace=namespace,
            text=text,
            meta=dict(metadata),
            embedding=vector.astype("<f4").tobytes(),
            model=embedded.model,
            version=version,
            created_at=now,
            updated_at=now,
            expires_at=expires,
        )
        session.add(item)
        await session.flush()
        return Remembered(item, merged=False, tokens=embedded.prompt_tokens)

    async def add_embedded(
        self,
        session: AsyncSession,
        principal: Principal,
        namespace: str,
        texts: list[str],
        metadatas: list[dict[str, Any]],
        embedded: Embeddings,
    ) -> list[MemoryItem]:
        """Store each text as a memory of its own, with the embedding given, under one new version.

        Never merges near-duplicates (unlike `remember`): document chunks that overlap or repeat stay
        one memory each, so a document's chunks are all there and go away with it.
        """
        check_namespace(namespace)
        now = utcnow()
        version = await bump_version(session, principal.tenant_id, namespace)
        items = [
            MemoryItem(
                id=new_id("mem"),
                key=random.getrandbits(62),
                tenant_id=principal.tenant_id,
                namespace=namespace,
                text=text,
                meta=dict(metadata),
                embedding=np.asarray(vector, dtype="<f4").tobytes(),
                model=embedded.model,
                version=version,
                created_at=now,
                updated_at=now,
            )
            for text, metadata, vector in zip(texts, metadatas, embedded.vectors, strict=True)
        ]
        session.add_all(items)
        await session.flush()
        return items

    async def recall(
        self,
        session: AsyncSession,
        principal: Principal,
        query: str,
        top_k: int,
        namespace: str,
        where: dict[str, Any],
        min_score: float | None,
    ) -> tuple[list[Recalled], int]:
        """The best `top_k` live memories for `query` (and the tokens the query embedding cost)."""
        check_namespace(namespace)
        embedded = await self._embed(principal, [query])
        vector = np.asarray(embedded.vectors[0], dtype=np.float32)
        wanted = top_k * self._settings.candidates_factor + (50 if where else 0)
        hits = await self._indexes.search(session, principal.tenant_id, namespace, vector, wanted)
        if not hits:
            return [], embedded.prompt_tokens
        similarity = {hit.id: hit.score for hit in hits}
        now = utcnow()
        rows = (
            await session.scalars(
                select(MemoryItem).where(
                    MemoryItem.tenant_id == principal.tenant_id,
                    MemoryItem.namespace == namespace,
                    MemoryItem.key.in_(list(similarity)),
                    MemoryItem.deleted_at.is_(None),
                )
            )
        ).all()
        ranking = self._settings.ranking
        found = [
            Recalled(row, similarity[row.key], ranking.score(similarity[row.key], row.updated_at, now))
            for row in rows
            if _alive(row, now) and _matches(row.meta, where)
        ]
        found.sort(key=lambda r: r.score, reverse=True)
        if min_score is not None:
            found = [r for r in found if r.score >= min_score]
        return found[:top_k], embedded.prompt_tokens

    async def get(self, session: AsyncSession, principal: Principal, memory_id: str) -> MemoryItem:
        """One live memory of the caller's tenant."""
        item = await session.scalar(
            select(MemoryItem).where(
                MemoryItem.id == memory_id,
                MemoryItem.tenant_id == principal.tenant_id,
                MemoryItem.deleted_at.is_(None),
            )
        )
        if item is None or not _alive(item, utcnow()):
            raise NotFound(f"no memory {memory_id!r}", param="id")
        return item

    async def list(
        self, session: AsyncSession, principal: Principal, namespace: str, limit: int, after: str | None
    ) -> list[MemoryItem]:
        """Live memories of a namespace, oldest first, `limit` at a time after the id `after`."""
        check_namespace(namespace)
        query = (
            select(MemoryItem)
            .where(
                MemoryItem.tenant_id == principal.tenant_id,
                MemoryItem.namespace == namespace,
                MemoryItem.deleted_at.is_(None),
            )
            .order_by(MemoryItem.id)
            .limit(limit)
        )
        if after is not None:
            query = query.where(MemoryItem.id > after)
        now = utcnow()
        return [row for row in (await session.scalars(query)).all() if _alive(row, now)]

    async def delete(self, session: AsyncSession, principal: Principal, memory_id: str) -> MemoryItem:
        """Forget one memory (every index drops it on its next sync)."""
        item = await self.get(session, principal, memory_id)
        item.version = await bump_version(session, principal.tenant_id, item.namespace)
        item.deleted_at = utcnow()
        await session.flush()
        return item

    async def _live_by_key(
        self, session: AsyncSession, tenant_id: str, namespace: str, key: int, now: datetime
    ) -> MemoryItem | None:
        item = await session.scalar(
            select(MemoryItem).where(
                MemoryItem.tenant_id == tenant_id,
                MemoryItem.namespace == namespace,
                MemoryItem.key == key,
                MemoryItem.deleted_at.is_(None),
            )
        )
        return item if item is not None and _alive(item, now) else None


async def bump_version(session: AsyncSession, tenant_id: str, namespace: str) -> int:
    """The namespace's next change version. The UPDATE takes the row's lock until commit, so
    concurrent writers of one namespace commit their versions in order."""
    bump = (
        update(MemoryNamespace)
        .where(MemoryNamespace.tenant_id == tenant_id, MemoryNamespace.namespace == namespace)
        .values(version=MemoryNamespace.version + 1)
        .returning(MemoryNamespace.version)
    )
    version = (await session.execute(bump)).scalar()
    if version is None:
        await session.execute(
            insert_skipping_duplicates(session, MemoryNamespace).values(
                tenant_id=tenant_id, namespace=namespace, version=0
            )
        )
        version = (await session.execute(bump)).scalar_one()
    return int(version)


def _alive(item: MemoryItem, now: datetime) -> bool:
    return item.expires_at is None or item.expires_at > now


def _matches(meta: dict[str, Any], where: dict[str, Any]) -> bool:
    """Every key of `where` equals the memory's metadata value (a list means any of its values)."""
    for key, wanted in where.items():
        value = meta.get(key)
        if isinstance(wanted, list):
            if value not in wanted:
                return False
        elif value != wanted:
            return False
    return True


__all__ = ["DEFAULT_NAMESPACE", "MemoryService", "MemorySettings", "Recalled", "Remembered"]
