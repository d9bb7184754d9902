"""The background loop every periodic task uses: its ticks, pokes, failures and stop."""

from __future__ import annotations

import asyncio
import logging

import pytest

from somaagent.core.periodic import Periodic

log = logging.getLogger(__name__)


async def test_a_poke_runs_the_step_before_the_tick_and_a_failure_does_not_end_the_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[int] = []

    async def step() -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("the database hiccupped")

    periodic = Periodic("test pass", step, 3600.0, log=log)
    periodic.start()
    periodic.start()  # a second start is no second loop
    await asyncio.sleep(0.05)
    assert calls == []  # the first tick is an hour away
    for expected in (1, 2):
        periodic.poke()
        for _ in range(100):
            if len(calls) == expected:
                break
            await asyncio.sleep(0.01)
        assert len(calls) == expected
    assert "test pass failed; trying again in 3600.0 s" in caplog.text
    assert "the database hiccupped" in caplog.text
    await periodic.close()
    periodic.poke()
    await asyncio.sleep(0.05)
    assert len(calls) == 2  # stopped: pokes do nothing


async def test_first_at_once_runs_at_start_then_every_interval() -> None:
    calls = 0

    async def step() -> None:
        nonlocal calls
        calls += 1

    periodic = Periodic("test pass", step, 0.05, log=log, first_at_once=True)
    periodic.start()
    await asyncio.sleep(0.01)
    assert calls == 1
    await asyncio.sleep(0.2)
    await periodic.close()
    assert 3 <= calls <= 6  # one at start, then a tick every 50 ms
