"""Fixtures of the counter tests: the machine's Redis, with a key prefix per test."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

REDIS_HINT = (
    "Redis is not reachable at 127.0.0.1:6379; start it with `redis-server --bind 127.0.0.1 --daemonize yes`"
)


@pytest.fixture
async def redis_prefix() -> AsyncIterator[tuple[Redis, str]]:
    """A client of the machine's Redis and a key prefix of this test's own; its keys are deleted after."""
    client = Redis(host="127.0.0.1", port=6379)
    try:
        await client.ping()
    except RedisConnectionError as exc:
        raise RuntimeError(REDIS_HINT) from exc
    prefix = f"test:{secrets.token_hex(6)}:"
    yield client, prefix
    keys = [key async for key in client.scan_iter(match=prefix + "*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()
