"""Rate limits on one model call: requests per minute, tokens per minute and requests in flight, for every
scope of the caller at once (tenant, user, key), all or nothing.

Owns: `ScopeLimits`, `RateLease`, the `RateLimiter` port and its two adapters: `LocalRateLimiter`
(one process, exact) and `RedisRateLimiter` (every replica, one Lua script per acquire).
May import: core, policy.redis_scripts, redis. Never: reads settings or the database (`policy/limits.py`
resolves what the limits are).

The guarantee, identical in both adapters (the algorithm is explained in `policy/redis_scripts.py`):
a scope may spend its whole minute at once, and the requests (tokens) admitted inside ANY window of
`window_s` seconds never exceed its rpm (tpm). A token reserved at acquire and not used is given back at
release. A concurrency slot is held until release or, if its process died, until the lease's deadline.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from redis.asyncio import Redis

from somaagent.core.errors import RateLimited
from somaagent.policy import redis_scripts

Scope = Literal["tenant", "user", "key"]
SCOPES: tuple[Scope, ...] = ("tenant", "user", "key")
WINDOW_S = 60.0  # what "per minute" means

_REQUESTS, _TOKENS, _CONCURRENCY, _TOO_LARGE = 1, 2, 3, 4
_CONCURRENCY_RETRY_S = 1.0  # a slot frees when some call ends, which no counter can predict


@dataclass(frozen=True, slots=True)
class ScopeLimits:
    """The limits of one scope of the caller; None: no limit of that kind there."""

    scope: str
    scope_id: str
    rpm: int | None
    tpm: int | None
    concurrent: int | None

    @property
    def windowed(self) -> bool:
        """Whether requests are counted in the sliding window here (an rpm or a tpm limit)."""
        return self.rpm is not None or self.tpm is not None


@dataclass(frozen=True, slots=True)
class RateLease:
    """An admitted call: what it holds until `release`."""

    lease_id: str
    limits: tuple[ScopeLimits, ...]
    tokens: int
    headers: dict[str, str]  # x-ratelimit-* of the tightest scope, after this call was counted
    admitted_at: float  # seconds on the limiter's clock (Redis: the server's unix time)


class RateLimiter(Protocol):
    """Admits a call against every scope's limits at once, or refuses it without taking anything."""

    async def acquire(self, lease_id: str, limits: Sequence[ScopeLimits], tokens: int) -> RateLease:
        """Count one request of `tokens` (worst case) on every scope, or raise `RateLimited`."""
        ...

    async def release(self, lease: RateLease, actual_tokens: int) -> None:
        """Free the lease's concurrency slots and count `actual_tokens` instead of what was reserved."""
        ...


@dataclass(frozen=True, slots=True)
class _ScopeState:
    """One scope's numbers for the x-ratelimit headers (None where not limited)."""

    limits: ScopeLimits
    requests_remaining: int | None
    tokens_remaining: int | None
    reset_s: float  # until the oldest request of the window leaves it


def format_reset(seconds: float) -> str:
    """A duration the way OpenAI's x-ratelimit-reset-* headers write it: "20ms", "1.5s", "6m0s"."""
    millis = max(0, math.ceil(seconds * 1000))
    if millis < 1000:
        return f"{millis}ms"
    minutes, rest = divmod(millis, 60_000)
    return f"{minutes}m{rest / 1000:g}s" if minutes else f"{rest / 1000:g}s"


def rate_headers(states: Sequence[_ScopeState]) -> dict[str, str]:
    """x-ratelimit-* of the tightest scope, separately for requests and for tokens (OpenAI's names)."""
    headers: dict[str, str] = {}
    requests = [s for s in states if s.requests_remaining is not None and s.limits.rpm is not None]
    if requests:
        tight = min(requests, key=lambda s: (s.requests_remaining, -s.reset_s))
        headers["x-ratelimit-limit-requests"] = str(tight.limits.rpm)
        headers["x-ratelimit-remaining-requests"] = str(tight.requests_remaining)
        headers["x-ratelimit-reset-requests"] = format_reset(tight.reset_s)
    tokens = [s for s in states if s.tokens_remaining is not None and s.limits.tpm is not None]
    if tokens:
        tight = min(tokens, key=lambda s: (s.tokens_remaining, -s.reset_s))
        headers["x-ratelimit-limit-tokens"] = str(tight.limits.tpm)
        headers["x-ratelimit-remaining-tokens"] = str(tight.tokens_remaining)
        headers["x-ratelimit-reset-tokens"] = format_reset(tight.reset_s)
    return headers


def refusal(
    limits: ScopeLimits, kind: int, retry_s: float, used: int, tokens: int, headers: dict[str, str]
) -> RateLimited:
    """The error for a call refused by `limits` (kind: which limit), naming the scope, limit and wait."""
    who = f"{limits.scope} {limits.scope_id}"
    wait = f"retry in {max(1, math.ceil(retry_s))} s"
    if kind == _REQUESTS:
        message = f"{who}: {limits.rpm} requests per minute (rpm) reached; {wait}"
    elif kind == _TOKENS:
        message = (
            f"{who}: {limits.tpm} tokens per minute (tpm) reached ({used} counted in the last minute, this "
            f"request needs {tokens}); {wait}"
        )
    elif kind == _TOO_LARGE:
        message = (
            f"{who}: this request needs {tokens} tokens, more than the whole limit of {limits.tpm} tokens "
            "per minute (tpm); lower max_tokens or shorten the prompt, or ask an admin to raise the limit "
            f"(PUT /v1/rate-limits/{limits.scope}/{limits.scope_id})"
        )
    else:
        message = f"{who}: {limits.concurrent} concurrent requests (concurrent) in flight; {wait}"
    return RateLimited(message, retry_after=retry_s, headers=headers)


@dataclass(slots=True)
class _Entry:
    lease_id: str
    at: float
    tokens: int


@dataclass(slots=True)
class _Window:
    entries: deque[_Entry] = field(default_factory=deque)
    by_lease: dict[str, _Entry] = field(default_factory=dict)
    tokens: int = 0


class LocalRateLimiter:
    """The limiter of one process. Exact: a check and its count run without an await between them, so no
    other task of the event loop can interleave."""

    def __init__(
        self,
        *,
        window_s: float = WINDOW_S,
        lease_ttl_s: float = 900.0,
    ) -> None:
        self._window_s = window_s
        self._lease_ttl_s = lease_ttl_s
        self._now = 0.0
        self._windows: dict[tuple[str, str], _Window] = {}
        self._inflight: dict[tuple[str, str], dict[str, float]] = {}
        self._acquires = 0

    async def acquire(self, lease_id: str, limits: Sequence[ScopeLimits], tokens: int) -> RateLease:
        """Count the request on every scope, or raise `RateLimited` having counted nothing."""
        self._now = now = max(self._now, time.monotonic())
        self._acquires += 1
        if self._acquires % 4096 == 0:
            self._forget_idle(now)
        refused: tuple[ScopeLimits, int, float, int] | None = None
        for scope in limits:
            key = (scope.scope, scope.scope_id)
            kind, retry, used = 0, -1.0, 0
            if scope.windowed:
                window = self._pruned_window(key, now)
                if lease_id in window.by_lease:
                    raise ValueError(f"duplicate lease id {lease_id!r}: lease ids must be unique")
                if scope.rpm is not None and len(window.entries) + 1 > scope.rpm:
                    # The (count + 1 - rpm)-th oldest must leave before one more fits.
                    index = len(window.entries) - scope.rpm
                    kind, used = _REQUESTS, len(window.entries)
                    fits = index < len(window.entries)
                    retry = window.entries[index].at + self._window_s - now if fits else self._window_s
                if scope.tpm is not None:
                    if tokens > scope.tpm:
                        kind, retry, used = _TOO_LARGE, self._window_s, window.tokens
                    elif window.tokens + tokens > scope.tpm:
                        wait = self._tokens_free_in(window, window.tokens + tokens - scope.tpm, now)
                        if wait > retry:
                            kind, retry, used = _TOKENS, wait, window.tokens
            if scope.concurrent is not None:
                inflight = self._pruned_inflight(key, now)
                if len(inflight) >= scope.concurrent and retry < _CONCURRENCY_RETRY_S:
                    kind, retry, used = _CONCURRENCY, _CONCURRENCY_RETRY_S, len(inflight)
            if kind and (refused is None or retry > refused[2]):
                refused = (scope, kind, retry, used)
        if refused is not None:
            scope, kind, retry, used = refused
            raise refusal(scope, kind, retry, used, tokens, rate_headers(self._states(limits, now)))
        for scope in limits:
            key = (scope.scope, scope.scope_id)
            if scope.windowed:
                window = self._windows[key]
                entry = _Entry(lease_id, now, tokens)
                window.entries.append(entry)
                window.by_lease[lease_id] = entry
                window.tokens += tokens
            if scope.concurrent is not None:
                self._inflight[key][lease_id] = now + self._lease_ttl_s
        return RateLease(lease_id, tuple(limits), tokens, rate_headers(self._states(limits, now)), now)

    async def release(self, lease: RateLease, actual_tokens: int) -> None:
        """Free the lease's slots; count `actual_tokens` for it if it is still inside the window."""
        for scope in lease.limits:
            key = (scope.scope, scope.scope_id)
            window = self._windows.get(key)
            entry = window.by_lease.get(lease.lease_id) if window is not None else None
            if window is not None and entry is not None:
                window.tokens += actual_tokens - entry.tokens
                entry.tokens = actual_tokens
            inflight = self._inflight.get(key)
            if inflight is not None:
                inflight.pop(lease.lease_id, None)

    def _pruned_window(self, key: tuple[str, str], now: float) -> _Window:
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = _Window()
        cutoff = now - self._window_s
        while window.entries and window.entries[0].at <= cutoff:
            gone = window.entries.popleft()
            window.tokens -= gone.tokens
            del window.by_lease[gone.lease_id]
        return window

    def _pruned_inflight(self, key: tuple[str, str], now: float) -> dict[str, float]:
        inflight = self._inflight.get(key)
        if inflight is None:
            inflight = self._inflight[key] = {}
        for lease_id in [lease for lease, deadline in inflight.items() if deadline <= now]:
            del inflight[lease_id]
        return inflight

    def _tokens_free_in(self, window: _Window, need: int, now: float) -> float:
        freed = 0
        for entry in window.entries:
            freed += entry.tokens
            if freed >= need:
                return entry.at + self._window_s - now
        return self._window_s

    def _states(self, limits: Sequence[ScopeLimits], now: float) -> list[_ScopeState]:
        states = []
        for scope in limits:
            window = self._windows.get((scope.scope, scope.scope_id))
            if window is None or not scope.windowed:
                continue
            reset = window.entries[0].at + self._window_s - now if window.entries else 0.0
            states.append(
                _ScopeState(
                    scope,
                    None if scope.rpm is None else max(0, scope.rpm - len(window.entries)),
                    None if scope.tpm is None else max(0, scope.tpm - window.tokens),
                    reset,
                )
            )
        return states

    def _forget_idle(self, now: float) -> None:
        # Scopes nobody called for a whole window hold nothing; without this the maps grow with every key.
        cutoff = now - self._window_s
        for key in [k for k, w in self._windows.items() if not w.entries or w.entries[-1].at <= cutoff]:
            del self._windows[key]
        for key in [k for k, i in self._inflight.items() if all(d <= now for d in i.values())]:
            del self._inflight[key]


class RedisRateLimiter:
    """The limiter shared by every replica: one Lua script (`RATE_ACQUIRE`) per acquire covers every scope,
    on Redis's clock; one (`RATE_RELEASE`) per release."""

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str = "soma:",
        window_s: float = WINDOW_S,
        lease_ttl_s: float = 900.0,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._window_us = int(window_s * 1_000_000)
        self._lease_ttl_us = int(lease_ttl_s * 1_000_000)
        self._acquire = redis_scripts.Script(redis_scripts.RATE_ACQUIRE)
        self._release = redis_scripts.Script(redis_scripts.RATE_RELEASE)

    def _keys(self, limits: Sequence[ScopeLimits]) -> list[str]:
        keys: list[str] = []
        for scope in limits:
            base = f"{self._prefix}rl:{scope.scope}:{scope.scope_id}:"
            keys += [base + "log", base + "cost", base + "sum", base + "inflight"]
        return keys

    async def acquire(self, lease_id: str, limits: Sequence[ScopeLimits], tokens: int) -> RateLease:
        """Count the request on every scope in one script, or raise `RateLimited` having counted nothing."""
        limited = tuple(s for s in limits if s.windowed or s.concurrent is not None)
        if not limited:
            return RateLease(lease_id, (), tokens, {}, time.time())
        args: list[str | int] = [lease_id, tokens, self._window_us, self._lease_ttl_us]
        for scope in limited:
            args += [_or_none(scope.rpm), _or_none(scope.tpm), _or_none(scope.concurrent)]
        reply = [int(v) for v in await self._acquire.run(self._redis, self._keys(limited), args)]
        now_s = reply[1] / 1_000_000
        if reply[0] == 1:
            return RateLease(lease_id, limited, tokens, _headers_from(limited, reply[2:]), now_s)
        index, kind, retry_us, used = reply[2:6]
        headers = _headers_from(limited, reply[6:])
        raise refusal(limited[index - 1], kind, retry_us / 1_000_000, used, tokens, headers)

    async def release(self, lease: RateLease, actual_tokens: int) -> None:
        """Free the lease's slots and correct its token count, in one script."""
        if lease.limits:
            await self._release.run(self._redis, self._keys(lease.limits), [lease.lease_id, actual_tokens])


def _or_none(limit: int | None) -> int:
    return -1 if limit is None else limit


def _headers_from(limits: Sequence[ScopeLimits], numbers: Sequence[int]) -> dict[str, str]:
    states = []
    for i, scope in enumerate(limits):
        requests, requests_reset, tokens, tokens_reset = numbers[4 * i : 4 * i + 4]
        if not scope.windowed:
            continue
        reset_us = requests_reset if requests >= 0 else tokens_reset
        states.append(
            _ScopeState(
                scope, requests if requests >= 0 else None, tokens if tokens >= 0 else None, reset_us / 1e6
            )
        )
    return rate_headers(states)
