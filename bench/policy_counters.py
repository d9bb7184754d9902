"""What rate limits and budgets add to one model call: acquire + release of the rate limits, and
reserve + settle of the budgets, per request, sequentially (the latency one call pays).

Setup: a caller with limits on all three scopes (tenant rpm/tpm/concurrency, user rpm, key tpm), set high
enough never to refuse, and a tokens budget on each of key, user and tenant (three holds per call).
1. `LocalRateLimiter` (in-process) and `RedisRateLimiter` (the machine's Redis on 127.0.0.1:6379,
   one Lua script per acquire and one per release).
2. `Budgets` over `SqlBudgetStore` on a fresh SQLite file (one transaction to reserve, one to settle),
   and over `RedisBudgetStore` (one script each). Budget settings come from the in-process cache.
p50/p99 of each pair, in milliseconds. Goal: <= 1 ms p50 with Redis.

Run: `.venv/bin/python bench/policy_counters.py [--quick]`; writes bench/results/policy_counters.json.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from redis.asyncio import Redis

from common import machine, markdown_table, percentile, write_results
from somaagent.core.clock import utcnow
from somaagent.core.ids import new_id
from somaagent.core.principal import Principal
from somaagent.db import migrate
from somaagent.db.engine import create_engine, session_factory
from somaagent.identity.tables import Tenant
from somaagent.policy.budgets import Budgets, BudgetStore, RedisBudgetStore, SqlBudgetStore
from somaagent.policy.prices import PriceBook
from somaagent.policy.ratelimit import LocalRateLimiter, RateLimiter, RedisRateLimiter, ScopeLimits

BIG = 10**12


async def timed(step: Callable[[], Awaitable[None]], n: int, warmup: int = 50) -> list[float]:
    """Milliseconds of each of `n` runs of `step`, after `warmup` unmeasured ones."""
    for _ in range(warmup):
        await step()
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        await step()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


async def rate_limit_pairs(limiter: RateLimiter, n: int) -> list[float]:
    limits = [
        ScopeLimits("tenant", f"ten_{secrets.token_hex(4)}", BIG, BIG, 1000),
        ScopeLimits("user", f"usr_{secrets.token_hex(4)}", BIG, None, None),
        ScopeLimits("key", f"key_{secrets.token_hex(4)}", None, BIG, None),
    ]

    async def pair() -> None:
        lease = await limiter.acquire(new_id("lease"), limits, 300)
        await limiter.release(lease, 120)

    return await timed(pair, n)


async def budget_pairs(store_of: Callable[[object], BudgetStore], n: int) -> list[float]:
    directory = Path(tempfile.mkdtemp(prefix="soma-bench-budgets-"))
    url = f"sqlite+aiosqlite:///{directory / 'soma.db'}"
    await asyncio.to_thread(migrate.upgrade, url)
    engine = create_engine(url)
    sessions = session_factory(engine)
    tenant = Tenant(
        id=new_id("ten"), name=f"bench-{secrets.token_hex(3)}", created_at=utcnow(), disabled=False
    )
    async with sessions() as session:
        session.add(tenant)
        await session.commit()
    caller = Principal(tenant.id, tenant.name, "key:k", new_id("key"), frozenset({"chat:use"}), new_id("usr"))
    budgets = Budgets(
        sessions, store_of(sessions), PriceBook(sessions, 60.0), ttl_s=60.0, reservation_ttl_s=900.0
    )
    async with sessions() as session:
        for scope, scope_id in (("tenant", tenant.id), ("user", caller.user_id), ("key", caller.key_id)):
            assert scope_id is not None
            await budgets.create(session, caller, scope, scope_id, "tokens", BIG, "day")
        await session.commit()

    async def pair() -> None:
        reservation = await budgets.reserve(caller, "bench-model", 200, 100)
        assert reservation is not None
        await budgets.settle(reservation, 200, 40)

    try:
        return await timed(pair, n)
    finally:
        await engine.dispose()


async def bench(quick: bool) -> dict[str, float]:
    n_fast, n_sql = (500, 100) if quick else (5000, 1000)
    redis = Redis(host="127.0.0.1", port=6379)
    prefix = f"bench:{secrets.token_hex(4)}:"
    results: dict[str, list[float]] = {}
    try:
        results["ratelimit_local"] = await rate_limit_pairs(LocalRateLimiter(), n_fast)
        results["ratelimit_redis"] = await rate_limit_pairs(RedisRateLimiter(redis, prefix=prefix), n_fast)
        results["budget_sqlite"] = await budget_pairs(SqlBudgetStore, n_sql)  # type: ignore[arg-type]
        results["budget_redis"] = await budget_pairs(
            lambda _s: RedisBudgetStore(redis, prefix=prefix), n_fast
        )
    finally:
        keys = [key async for key in redis.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()
    figures: dict[str, float] = {}
    for name, samples in results.items():
        figures[f"{name}_p50_ms"] = round(percentile(samples, 50), 4)
        figures[f"{name}_p99_ms"] = round(percentile(samples, 99), 4)
    return figures


def bench_counters(quick: bool = False) -> dict[str, float]:
    """p50/p99 (ms) of rate-limit acquire+release and budget reserve+settle, in-process and on Redis."""
    return asyncio.run(bench(quick))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    args = parser.parse_args()
    figures = bench_counters(args.quick)
    rows = [
        [name, figures[f"{name}_p50_ms"], figures[f"{name}_p99_ms"]]
        for name in ("ratelimit_local", "ratelimit_redis", "budget_sqlite", "budget_redis")
    ]
    print(markdown_table(["per call (pair)", "p50 ms", "p99 ms"], rows))
    path = write_results("policy_counters", {"machine": machine(), "figures": figures})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
