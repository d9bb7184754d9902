"""Process-local vector indexes kept in step with the database, one per (tenant, namespace).

The database is the source of truth; an index is a cache of it. Before each search the index applies
the rows whose namespace version is above the last one it applied (new, changed and soft-deleted
memories), so every worker and replica answers from what is committed, and a fresh process rebuilds
its indexes from the database on first use (`soma memory reindex` is therefore a restart of that).
Every index call runs in a worker thread: a server-backed index (Qdrant) does network I/O in each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.memory.index import Hit, VectorIndex
from somaagent.memory.tables import MemoryItem

# (tenant_id, namespace, dimensions) -> the index for that namespace; embedded adapters ignore the
# scope (each gets its own object), a shared server index filters by it.
IndexFactory = Callable[[str, str, int], VectorIndex]


class _Entry:
    def __init__(self, index: VectorIndex) -> None:
        self.index = index
        self.version = 0
        self.lock = asyncio.Lock()


class SyncedIndexes:
    """One synced index per (tenant, namespace), created on first use."""

    def __init__(self, factory: IndexFactory) -> None:
        self._factory = factory
        self._entries: dict[tuple[str, str], _Entry] = {}

    async def search(
        self, session: AsyncSession, tenant_id: str, namespace: str, query: np.ndarray, k: int
    ) -> list[Hit]:
        """Top `k` keys of this tenant's namespace after catching up with the database."""
        entry = self._entries.get((tenant_id, namespace))
        if entry is None:
            index = self._factory(tenant_id, namespace, len(query))
            entry = self._entries.setdefault((tenant_id, namespace), _Entry(index))
        async with entry.lock:
            await self._catch_up(session, tenant_id, namespace, entry)
            return await asyncio.to_thread(entry.index.search, query, k)

    async def _catch_up(self, session: AsyncSession, tenant_id: str, namespace: str, entry: _Entry) -> None:
        rows = (
            await session.execute(
                select(MemoryItem.key, MemoryItem.embedding, MemoryItem.deleted_at, MemoryItem.version)
                .where(
                    MemoryItem.tenant_id == tenant_id,
                    MemoryItem.namespace == namespace,
                    MemoryItem.version > entry.version,
                )
                .order_by(MemoryItem.version)
            )
        ).all()
        if not rows:
            return
        gone = [key for key, _, deleted, _ in rows if deleted is not None]
        live = [(key, vector) for key, vector, deleted, _ in rows if deleted is None]
        if gone:
            await asyncio.to_thread(entry.index.remove, gone)
        if live:
            keys = [key for key, _ in live]
            matrix = np.frombuffer(b"".join(vector for _, vector in live), dtype="<f4").reshape(len(live), -1)
            await asyncio.to_thread(entry.index.upsert, keys, matrix)
        entry.version = rows[-1][3]
