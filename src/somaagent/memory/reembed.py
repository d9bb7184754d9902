"""Re-embedding stored memories (`soma memory reindex`), e.g. after changing the embedding model.

Rows are rewritten in batches, each batch under one new namespace version, so every process's index
picks the new vectors up on its next search; the indexes themselves are rebuilt from the database.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import numpy as np
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.memory.service import bump_version
from somaagent.memory.tables import MemoryItem
from somaagent.models.messages import Embeddings

EmbedTexts = Callable[[list[str]], Awaitable[Embeddings]]


async def reembed_memories(
    sessions: async_sessionmaker[AsyncSession],
    embed: EmbedTexts,
    model: str,
    tenant_id: str | None = None,
    namespace: str | None = None,
    everything: bool = False,
    batch: int = 64,
) -> int:
    """Re-embed live memories made by another model (all of them with `everything`); returns how many."""
    done = 0
    after = ""
    while True:
        async with sessions() as session, session.begin():
            query = (
                select(MemoryItem)
                .where(MemoryItem.deleted_at.is_(None), MemoryItem.id > after)
                .order_by(MemoryItem.id)
                .limit(batch)
            )
            if tenant_id is not None:
                query = query.where(MemoryItem.tenant_id == tenant_id)
            if namespace is not None:
                query = query.where(MemoryItem.namespace == namespace)
            if not everything:
                query = query.where(MemoryItem.model != model)
            rows = list((await session.scalars(query)).all())
            if not rows:
                return done
            embedded = await embed([row.text for row in rows])
            versions: dict[tuple[str, str], int] = {}
            for row, vector in zip(rows, embedded.vectors, strict=True):
                scope = (row.tenant_id, row.namespace)
                if scope not in versions:
                    versions[scope] = await bump_version(session, *scope)
                row.embedding = np.asarray(vector, dtype="<f4").tobytes()
                row.model = embedded.model
                row.version = versions[scope]
            done += len(rows)
            after = rows[-1].id
