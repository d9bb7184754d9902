"""Failed-login throttling per account and per client address, shared by every replica through the
database. Unknown accounts are throttled exactly like real ones, so a lockout reveals nothing."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.core.errors import RateLimited
from somaagent.identity.tables import LoginThrottle


@dataclass(frozen=True, slots=True)
class ThrottlePolicy:
    """How many failures inside `window_s` lock an account (or an address) for `lockout_s`."""

    account_failures: int = 5
    address_failures: int = 50
    window_s: float = 900.0
    lockout_s: float = 900.0


def account_key(tenant: str, username: str) -> str:
    """The throttle key of one login name in one tenant, normalised as usernames are (so " Boss" and
    "boss" share one count)."""
    return f"account:{tenant}:{username.strip().lower()}"[:255]


def address_key(address: str | None) -> str:
    """The throttle key of a client address."""
    return f"ip:{address or 'unknown'}"[:255]


def refusal(key: str, wait_s: float) -> RateLimited:
    """The error for an attempt refused because `key` is locked for `wait_s` more seconds."""
    what = "account" if key.startswith("account:") else "address"
    return RateLimited(
        f"too many failed attempts for this {what}; try again in {int(wait_s) + 1} s"
        + (" or ask a tenant admin to unlock it" if what == "account" else ""),
        retry_after=wait_s,
    )


async def reserve_attempt(
    session: AsyncSession, policy: ThrottlePolicy, key: str, limit: int, now: datetime
) -> float | None:
    """Count one attempt against `key` BEFORE its secret is checked, and say how long to wait (None: go
    ahead). Counting first means concurrent attempts cannot all slip past the limit; a success gives the
    count back (`clear`, `release`). Race-safe: the count is incremented in the database."""
    window_start = now - timedelta(seconds=policy.window_s)
    # A window that has passed, or a lockout that has ended, starts over.
    await session.execute(
        update(LoginThrottle)
        .where(
            LoginThrottle.key == key,
            (LoginThrottle.window_started_at < window_start) | (LoginThrottle.locked_until <= now),
        )
        .values(failures=0, window_started_at=now, locked_until=None)
    )
    bumped = await session.execute(
        update(LoginThrottle).where(LoginThrottle.key == key).values(failures=LoginThrottle.failures + 1)
    )
    if not bumped.rowcount:  # type: ignore[attr-defined]
        try:
            async with session.begin_nested():
                session.add(LoginThrottle(key=key, failures=1, window_started_at=now, locked_until=None))
        except IntegrityError:  # another replica inserted it first
            await session.execute(
                update(LoginThrottle)
                .where(LoginThrottle.key == key)
                .values(failures=LoginThrottle.failures + 1)
            )
    row = (
        await session.execute(
            select(LoginThrottle.failures, LoginThrottle.locked_until).where(LoginThrottle.key == key)
        )
    ).one()
    failures, locked_until = row
    if locked_until is not None and locked_until > now:
        return (locked_until - now).total_seconds()
    if failures > limit:
        await session.execute(
            update(LoginThrottle)
            .where(LoginThrottle.key == key)
            .values(locked_until=now + timedelta(seconds=policy.lockout_s))
        )
        return policy.lockout_s
    return None


async def release(session: AsyncSession, key: str) -> None:
    """Give back one attempt that succeeded (an address's count is of failures, not of logins)."""
    await session.execute(
        update(LoginThrottle)
        .where(LoginThrottle.key == key, LoginThrottle.failures > 0)
        .values(failures=LoginThrottle.failures - 1)
    )


async def clear(session: AsyncSession, key: str) -> bool:
    """Forget the failures and lockout of `key` (a good login, or an admin unlocking); whether it had any."""
    result = await session.execute(delete(LoginThrottle).where(LoginThrottle.key == key))
    return bool(result.rowcount)  # type: ignore[attr-defined]
