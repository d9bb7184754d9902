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
    """The throttle key of one login name in one tenant."""
    return f"account:{tenant}:{username.lower()}"[:255]


def address_key(address: str | None) -> str:
    """The throttle key of a client address."""
    return f"ip:{address or 'unknown'}"[:255]


async def ensure_not_locked(session: AsyncSession, keys: list[str], now: datetime) -> None:
    """Raise `RateLimited` (with Retry-After) if any of `keys` is locked."""
    rows = (await session.scalars(select(LoginThrottle).where(LoginThrottle.key.in_(keys)))).all()
    for row in rows:
        if row.locked_until is not None and row.locked_until > now:
            wait = (row.locked_until - now).total_seconds()
            what = "account" if row.key.startswith("account:") else "address"
            raise RateLimited(
                f"too many failed logins for this {what}; try again in {int(wait) + 1} s"
                + (" or ask a tenant admin to unlock it" if what == "account" else ""),
                retry_after=wait,
            )


async def record_failure(
    session: AsyncSession, policy: ThrottlePolicy, key: str, limit: int, now: datetime
) -> None:
    """Count one failure against `key`, locking it when the window's count reaches `limit`. Race-safe: the
    count is incremented in the database, not read and written back."""
    window_start = now - timedelta(seconds=policy.window_s)
    # A window that has passed starts over.
    await session.execute(
        update(LoginThrottle)
        .where(LoginThrottle.key == key, LoginThrottle.window_started_at < window_start)
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
    await session.execute(
        update(LoginThrottle)
        .where(LoginThrottle.key == key, LoginThrottle.failures >= limit)
        .values(locked_until=now + timedelta(seconds=policy.lockout_s))
    )


async def clear(session: AsyncSession, key: str) -> bool:
    """Forget the failures and lockout of `key` (a good login, or an admin unlocking); whether it had any."""
    result = await session.execute(delete(LoginThrottle).where(LoginThrottle.key == key))
    return bool(result.rowcount)  # type: ignore[attr-defined]
