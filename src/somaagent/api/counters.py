"""The counters of one process, built by the app factory: rate limits and budgets counted in this process
and the database (`SOMA_COUNTERS=local`) or in Redis (`SOMA_COUNTERS=redis`), and the price book."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.config import Settings
from somaagent.core.errors import UpstreamError
from somaagent.policy.budgets import Budgets, RedisBudgetStore, SqlBudgetStore
from somaagent.policy.limits import RateLimits
from somaagent.policy.prices import PriceBook
from somaagent.policy.ratelimit import LocalRateLimiter, RateLimiter, RedisRateLimiter


@dataclass
class Counters:
    """The governance counters of one process, and the Redis client they share (None: local)."""

    rate_limits: RateLimits
    rate_limiter: RateLimiter
    prices: PriceBook
    budgets: Budgets
    redis: Redis | None

    @property
    def readiness(self) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
        """The check for `/readyz`: Redis answers (none when counting locally)."""
        redis = self.redis
        if redis is None:
            return []

        async def ping() -> None:
            try:
                await redis.ping()
            except RedisError as exc:  # the message would name the host; the URL may carry a password
                raise UpstreamError(f"Redis (SOMA_REDIS_URL) is not reachable: {type(exc).__name__}") from exc

        return [("redis", ping)]

    async def close(self) -> None:
        """Stop the budget sweeper and close the Redis connections."""
        await self.budgets.close()
        if self.redis is not None:
            await self.redis.aclose()


def build_counters(settings: Settings, sessions: async_sessionmaker[AsyncSession]) -> Counters:
    """Rate limits and budgets counted where `settings.counters` says."""
    rate_limits = RateLimits(sessions, settings.rate_limit_defaults, settings.policy_cache_ttl_s)
    prices = PriceBook(sessions, settings.policy_cache_ttl_s)
    redis: Redis | None = None
    # A call that outlives the reservation TTL is taken for dead: its concurrency slot frees then too.
    lease_ttl_s = settings.budget_reservation_ttl_s
    if settings.counters == "redis":
        # Timeouts, so that a Redis that stops answering refuses calls (503) instead of hanging them.
        redis = Redis.from_url(settings.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
        limiter: RateLimiter = RedisRateLimiter(redis, lease_ttl_s=lease_ttl_s)
        budgets = Budgets(
            sessions,
            RedisBudgetStore(redis),
            prices,
            ttl_s=settings.policy_cache_ttl_s,
            reservation_ttl_s=settings.budget_reservation_ttl_s,
        )
    else:
        limiter = LocalRateLimiter(lease_ttl_s=lease_ttl_s)
        budgets = Budgets(
            sessions,
            SqlBudgetStore(sessions),
            prices,
            ttl_s=settings.policy_cache_ttl_s,
            reservation_ttl_s=settings.budget_reservation_ttl_s,
        )
    return Counters(rate_limits, limiter, prices, budgets, redis)
