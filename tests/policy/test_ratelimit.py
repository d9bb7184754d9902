"""Rate limits, in-process and on the real Redis (127.0.0.1:6379): exact admission counts, the sliding
window guarantee (never more than the limit in any window), all-or-nothing across scopes, token refunds,
concurrency leases freed on release and after their deadline, and three OS processes sharing one limit."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.core.clock import utcnow
from somaagent.core.errors import InvalidRequest, NotFound, Overloaded, RateLimited
from somaagent.core.ids import new_id
from somaagent.core.principal import Principal
from somaagent.identity.tables import Tenant
from somaagent.policy.limits import RateLimits
from somaagent.policy.ratelimit import LocalRateLimiter, RateLimiter, RedisRateLimiter, ScopeLimits

pytestmark = pytest.mark.asyncio(loop_scope="session")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["local", "redis"])
def make_limiter(request: pytest.FixtureRequest, redis_prefix: tuple[Redis, str]) -> object:
    """A factory of limiters of one kind: `make(window_s=..., lease_ttl_s=...)`."""
    client, prefix = redis_prefix

    def make(window_s: float = 60.0, lease_ttl_s: float = 900.0) -> RateLimiter:
        if request.param == "local":
            return LocalRateLimiter(window_s=window_s, lease_ttl_s=lease_ttl_s)
        return RedisRateLimiter(client, prefix=prefix, window_s=window_s, lease_ttl_s=lease_ttl_s)

    return make


def lease() -> str:
    return f"lease_{secrets.token_hex(8)}"


async def admitted(limiter: RateLimiter, limits: list[ScopeLimits], attempts: int, tokens: int = 1) -> int:
    count = 0
    for _ in range(attempts):
        try:
            await limiter.acquire(lease(), limits, tokens)
            count += 1
        except RateLimited:
            pass
    return count


async def test_a_whole_minute_may_be_spent_at_once_and_not_one_more(make_limiter) -> None:
    limiter = make_limiter()
    key = ScopeLimits("key", "k_x", rpm=10, tpm=None, concurrent=None)
    assert await admitted(limiter, [key], 10) == 10
    with pytest.raises(RateLimited) as refused:
        await limiter.acquire(lease(), [key], 1)
    error = refused.value
    assert error.message.startswith("key k_x: 10 requests per minute (rpm) reached; retry in ")
    assert error.message.endswith(" s")
    assert 59 < error.retry_after <= 60
    assert error.headers["x-ratelimit-limit-requests"] == "10"
    assert error.headers["x-ratelimit-remaining-requests"] == "0"
    assert await admitted(limiter, [key], 5) == 0  # refusals are not counted, and never let one through


async def test_no_window_ever_holds_more_than_the_limit_and_retry_after_is_exact(make_limiter) -> None:
    window = 0.5
    limiter = make_limiter(window_s=window)
    scope = ScopeLimits("user", "u_1", rpm=4, tpm=None, concurrent=None)
    times: list[float] = []
    deadline = time.monotonic() + 1.6
    while time.monotonic() < deadline:
        try:
            times.append((await limiter.acquire(lease(), [scope], 1)).admitted_at)
        except RateLimited as refused:
            await asyncio.sleep(refused.retry_after)
            # Waiting exactly `retry_after` is enough: the next request fits.
            times.append((await limiter.acquire(lease(), [scope], 1)).admitted_at)
    # The guarantee: for any admission at t, the admissions in (t - window, t] number at most the limit.
    for t in times:
        assert sum(1 for u in times if t - window < u <= t) <= 4
    # ...and the whole limit of every window was usable: 4 per window, over at least 3 windows.
    assert len(times) >= 12, len(times)


async def test_a_refusal_by_one_scope_takes_nothing_from_the_others(make_limiter) -> None:
    limiter = make_limiter()
    tenant = ScopeLimits("tenant", "t_1", rpm=100, tpm=None, concurrent=3)
    key = ScopeLimits("key", "k_1", rpm=2, tpm=50, concurrent=None)
    assert await admitted(limiter, [tenant, key], 2) == 2
    with pytest.raises(RateLimited, match=r"^key k_1: 2 requests per minute \(rpm\) reached"):
        await limiter.acquire(lease(), [tenant, key], 1)
    with pytest.raises(RateLimited, match=r"more than the whole limit of 50 tokens per minute \(tpm\)"):
        await limiter.acquire(lease(), [tenant, key], 51)
    # The tenant counted the two admitted requests only, and holds only their two concurrency slots.
    alone = await limiter.acquire(lease(), [tenant], 1)
    assert alone.headers["x-ratelimit-remaining-requests"] == str(100 - 3)
    with pytest.raises(RateLimited, match=r"^tenant t_1: 3 concurrent requests \(concurrent\) in flight"):
        await limiter.acquire(lease(), [tenant], 1)


async def test_tokens_not_used_are_given_back_at_release(make_limiter) -> None:
    limiter = make_limiter()
    scope = ScopeLimits("key", "k_2", rpm=None, tpm=100, concurrent=None)
    first = await limiter.acquire(lease(), [scope], 60)
    assert first.headers["x-ratelimit-remaining-tokens"] == "40"
    with pytest.raises(RateLimited) as refused:
        await limiter.acquire(lease(), [scope], 60)
    assert "100 tokens per minute (tpm) reached (60 counted in the last minute, this request needs 60)" in (
        refused.value.message
    )
    await limiter.release(first, 10)  # it used 10 of its 60
    second = await limiter.acquire(lease(), [scope], 60)
    assert second.headers["x-ratelimit-remaining-tokens"] == "30"
    with pytest.raises(RateLimited):
        await limiter.acquire(lease(), [scope], 31)
    await limiter.acquire(lease(), [scope], 30)  # exactly the limit
    # A call that used more than it reserved is counted at what it used.
    await limiter.release(second, 70)
    with pytest.raises(RateLimited) as over:
        await limiter.acquire(lease(), [scope], 1)
    assert "(110 counted" in over.value.message


async def test_a_concurrency_slot_frees_on_release_and_after_its_deadline(make_limiter) -> None:
    limiter = make_limiter(lease_ttl_s=0.4)
    scope = ScopeLimits("key", "k_3", rpm=None, tpm=None, concurrent=2)
    one = await limiter.acquire(lease(), [scope], 0)
    await limiter.acquire(lease(), [scope], 0)
    with pytest.raises(RateLimited, match=r"2 concurrent requests \(concurrent\) in flight; retry in 1 s"):
        await limiter.acquire(lease(), [scope], 0)
    await limiter.release(one, 0)
    await limiter.acquire(lease(), [scope], 0)  # the released slot
    with pytest.raises(RateLimited):
        await limiter.acquire(lease(), [scope], 0)
    # Nobody releases the two held now (their process "died"): their deadline frees them.
    await asyncio.sleep(0.45)
    assert await admitted(limiter, [scope], 3, tokens=0) == 2


async def test_unlimited_scopes_are_not_counted(make_limiter) -> None:
    limiter = make_limiter()
    free = ScopeLimits("tenant", "t_free", rpm=None, tpm=None, concurrent=None)
    got = await limiter.acquire(lease(), [free], 1_000_000)
    assert got.headers == {}
    await limiter.release(got, 5)


async def test_a_lease_id_counts_once(make_limiter) -> None:
    limiter = make_limiter()
    scope = ScopeLimits("key", "k_4", rpm=5, tpm=None, concurrent=None)
    await limiter.acquire("lease_same", [scope], 1)
    with pytest.raises((ValueError, ResponseError), match="duplicate lease id"):
        await limiter.acquire("lease_same", [scope], 1)


WORKER = """
import asyncio, json, sys, time
from redis.asyncio import Redis
from somaagent.core.errors import RateLimited
from somaagent.core.ids import new_id
from somaagent.policy.ratelimit import RedisRateLimiter, ScopeLimits

prefix, start_at, attempts = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])

async def main() -> None:
    client = Redis(host="127.0.0.1", port=6379)
    limiter = RedisRateLimiter(client, prefix=prefix)
    limits = [
        ScopeLimits("tenant", "t_shared", 600, None, None),
        ScopeLimits("key", "k_shared", None, 100000, 8),
    ]
    admitted = 0
    queue = iter(range(attempts))
    async def hammer() -> None:
        nonlocal admitted
        for _ in queue:
            try:
                lease = await limiter.acquire(new_id("lease"), limits, 10)
            except RateLimited:
                continue
            admitted += 1
            await limiter.release(lease, 7)
    await asyncio.sleep(max(0.0, start_at - time.time()))
    await asyncio.gather(*(hammer() for _ in range(8)))
    await client.aclose()
    print(json.dumps({"admitted": admitted}))

asyncio.run(main())
"""


async def test_three_processes_share_one_redis_limit_exactly(redis_prefix: tuple[Redis, str]) -> None:
    client, prefix = redis_prefix
    start_at = time.time() + 2.0  # every worker has imported and connected by then
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, prefix, str(start_at), "500"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        for _ in range(3)
    ]
    results = []
    for worker in workers:
        out, err = await asyncio.to_thread(worker.communicate, timeout=60)
        assert worker.returncode == 0, err.decode()
        results.append(json.loads(out)["admitted"])
    total = sum(results)
    # 1 500 attempts within seconds against 600 per minute: the limit, exactly (well within 1 %).
    assert abs(total - 600) <= 6, results
    assert total == 600, results
    assert all(r > 0 for r in results), results  # every process got some: they really competed
    assert await client.zcard(f"{prefix}rl:tenant:t_shared:log") == 600
    assert int(await client.get(f"{prefix}rl:key:k_shared:sum")) == 600 * 7  # refunds from 10 to 7 each
    assert await client.zcard(f"{prefix}rl:key:k_shared:inflight") == 0  # every lease released


async def make_tenant(sessions: async_sessionmaker[AsyncSession]) -> Principal:
    """A tenant in the database, and a key of one of its users calling."""
    tenant = Tenant(id=new_id("ten"), name=f"t-{secrets.token_hex(4)}", created_at=utcnow(), disabled=False)
    async with sessions() as session:
        session.add(tenant)
        await session.commit()
    key_id = new_id("key")
    return Principal(
        tenant.id, tenant.name, f"key:{key_id}", key_id, frozenset({"policy:admin"}), new_id("usr")
    )


async def test_limits_resolve_rows_before_defaults_per_scope(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    limits = RateLimits(sessions, {"key": {"rpm": 5}, "user": {"tpm": 100, "concurrent": 2}}, ttl_s=0.3)
    caller, stranger = await make_tenant(sessions), await make_tenant(sessions)
    assert caller.user_id is not None and caller.key_id is not None
    assert await limits.for_principal(caller) == [
        ScopeLimits("user", caller.user_id, None, 100, 2),
        ScopeLimits("key", caller.key_id, 5, None, None),
    ]
    async with sessions() as session:
        await limits.set(session, caller, "tenant", caller.tenant_id, 50, 5000, None)
        # A row with no limits exempts the key from the default.
        await limits.set(session, caller, "key", caller.key_id, None, None, None)
        await session.commit()
    assert await limits.for_principal(caller) == [  # changes made here apply at once
        ScopeLimits("tenant", caller.tenant_id, 50, 5000, None),
        ScopeLimits("user", caller.user_id, None, 100, 2),
    ]
    async with sessions() as session:
        assert [(r.scope, r.scope_id) for r in await limits.list(session, caller)] == [
            ("tenant", caller.tenant_id),
            ("key", caller.key_id),
        ]
        assert await limits.list(session, stranger) == []
        with pytest.raises(NotFound):
            await limits.delete(session, stranger, "key", caller.key_id)
        await limits.delete(session, caller, "key", caller.key_id)
        await session.commit()
    assert (await limits.for_principal(caller))[-1] == ScopeLimits("key", caller.key_id, 5, None, None)
    assert [s.scope_id for s in await limits.for_principal(stranger)] == [stranger.user_id, stranger.key_id]


async def test_limits_set_on_another_replica_apply_within_the_cache_ttl(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    here, elsewhere = RateLimits(sessions, {}, ttl_s=0.3), RateLimits(sessions, {}, ttl_s=0.3)
    caller = await make_tenant(sessions)
    assert await here.for_principal(caller) == []
    async with sessions() as session:
        await elsewhere.set(session, caller, "tenant", caller.tenant_id, 7, None, None)
        await session.commit()
    assert await here.for_principal(caller) == []  # still trusting its copy
    await asyncio.sleep(0.35)
    assert await here.for_principal(caller) == [ScopeLimits("tenant", caller.tenant_id, 7, None, None)]


async def test_limit_settings_are_validated(sessions: async_sessionmaker[AsyncSession]) -> None:
    with pytest.raises(ValueError, match="unknown names"):
        RateLimits(sessions, {"team": {"rpm": 1}}, ttl_s=1)
    with pytest.raises(ValueError, match="unknown names"):
        RateLimits(sessions, {"key": {"burst": 1}}, ttl_s=1)
    limits = RateLimits(sessions, {}, ttl_s=1)
    caller = await make_tenant(sessions)
    async with sessions() as session:
        with pytest.raises(InvalidRequest) as bad:
            await limits.set(session, caller, "key", "k", 0, None, None)
        assert bad.value.param == "rpm"
        with pytest.raises(InvalidRequest, match="unknown scope 'team'"):
            await limits.set(session, caller, "team", "k", 1, None, None)


async def test_an_unreachable_redis_refuses_calls_with_a_clear_503() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once closed: a real connection refusal
    client = Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
    limiter = RedisRateLimiter(client, prefix="test:unreachable:")
    with pytest.raises(Overloaded, match=r"counters \(Redis, SOMA_REDIS_URL\) are not reachable"):
        await limiter.acquire(lease(), [ScopeLimits("key", "k", 1, None, None)], 1)
    await client.aclose()
