"""An async `Embedder` around a blocking one: bounded concurrency, run in a worker thread."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np

from somaagent.models.messages import Embeddings
from somaagent.models.slots import ModelSlots


class BlockingEmbedder(Protocol):
    """What a local embedding model offers (see `minilm.MiniLMEmbedder`)."""

    id: str
    dimensions: int

    def load(self) -> None: ...

    def embed_sync(self, texts: list[str]) -> tuple[np.ndarray, int]: ...


class ThreadedEmbedder:
    """Runs a blocking embedder off the event loop, behind the same slots/queue as chat models."""

    def __init__(self, model: BlockingEmbedder, slots: ModelSlots) -> None:
        self.id = model.id
        self.dimensions = model.dimensions
        self._model = model
        self._slots = slots
        self._executor = ThreadPoolExecutor(
            max_workers=slots.capacity, thread_name_prefix=f"embed-{model.id}"
        )

    @property
    def slots(self) -> ModelSlots:
        """The admission control in front of this model (for metrics)."""
        return self._slots

    async def ready(self) -> None:
        """Load the model (once)."""
        await asyncio.get_running_loop().run_in_executor(self._executor, self._model.load)

    async def embed(self, texts: list[str]) -> Embeddings:
        """Vectors for `texts`, in order."""
        async with self._slots.acquire():
            matrix, tokens = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._model.embed_sync, texts
            )
        return Embeddings(model=self.id, vectors=matrix.tolist(), prompt_tokens=tokens)

    async def close(self) -> None:
        """Stop the worker threads."""
        self._executor.shutdown(wait=False, cancel_futures=True)
