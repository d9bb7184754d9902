"""Bounded concurrency with a bounded wait queue: the back-pressure in front of a local model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from somaagent.core.errors import Overloaded


class ModelSlots:
    """At most `slots` holders at once and at most `queue` waiting; a caller beyond that is refused
    at once with `Overloaded` (→ 503 + Retry-After) instead of piling up unbounded latency."""

    def __init__(self, model_id: str, slots: int, queue: int, retry_after_s: float = 1.0) -> None:
        self.model_id = model_id
        self.capacity = slots
        self.queue_limit = queue
        self._semaphore = asyncio.Semaphore(slots)
        self._waiting = 0
        self._busy = 0
        self._retry_after_s = retry_after_s

    @property
    def waiting(self) -> int:
        """How many callers wait for a slot now."""
        return self._waiting

    @property
    def busy(self) -> int:
        """How many slots are held now."""
        return self._busy

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[None]:
        """Hold one slot for the duration of the block."""
        if self._semaphore.locked() and self._waiting >= self.queue_limit:
            raise Overloaded(
                f"model {self.model_id!r} is busy ({self.capacity} running, {self._waiting} waiting); "
                "retry shortly",
                retry_after=self._retry_after_s,
            )
        self._waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self._waiting -= 1
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1
            self._semaphore.release()
