"""Work a process repeats in the background: one step every `interval_s`, or sooner when poked.

Owns: `Periodic`. May import: stdlib. Never: decides what a step does, or lets a failed step end the
loop (it is logged, and the next tick tries again: a database hiccup must not stop a sweeper).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable


class Periodic:
    """Runs `step` every `interval_s` once started (the first time at once with `first_at_once`,
    else after one interval); `poke` runs it soon; `close` cancels it, a step under way included."""

    def __init__(
        self,
        name: str,
        step: Callable[[], Awaitable[object]],
        interval_s: float,
        *,
        log: logging.Logger,
        first_at_once: bool = False,
    ) -> None:
        self._name = name
        self._step = step
        self._interval_s = interval_s
        self._log = log
        self._first_at_once = first_at_once
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin (once; a second call does nothing)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self._name)

    def poke(self) -> None:
        """Run the step soon rather than at the next tick."""
        self._wakeup.set()

    async def close(self) -> None:
        """Stop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        if not self._first_at_once:
            await self._wait()
        while True:
            try:
                await self._step()
            except Exception:
                self._log.warning(
                    "%s failed; trying again in %.1f s", self._name, self._interval_s, exc_info=True
                )
            await self._wait()

    async def _wait(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout=self._interval_s)
        self._wakeup.clear()
