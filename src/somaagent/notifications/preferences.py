"""Per-user preferences: which channels, from which severity, quiet hours, and the email address."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import time

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.core.clock import utcnow
from somaagent.core.errors import InvalidRequest
from somaagent.events.notices import SEVERITIES
from somaagent.notifications.quiet_hours import QuietHours, clock_text
from somaagent.notifications.tables import Preference

PERSONAL_CHANNELS = ("websocket", "email")  # webhooks belong to the tenant, not to a person
MAX_EMAIL = 254


@dataclass(frozen=True, slots=True)
class Preferences:
    """A user's notification preferences (the defaults when they set none)."""

    channels: tuple[str, ...] = ("websocket",)
    min_severity: str = "info"
    email: str | None = None  # None: the username, when it is an address
    quiet: QuietHours | None = None


DEFAULT = Preferences()


def severity_rank(severity: str) -> int:
    """0 for `info` … 3 for `critical`."""
    return [str(s) for s in SEVERITIES].index(severity)


def email_of(preferences: Preferences, username: str) -> str | None:
    """Where this user's email goes: the address they set, else their username when it is one."""
    if preferences.email:
        return preferences.email
    return username if _looks_like_email(username) else None


def _looks_like_email(value: str) -> bool:
    local, at, domain = value.rpartition("@")
    return bool(at and local and "." in domain and not domain.startswith(".") and len(value) <= MAX_EMAIL)


def validated(
    channels: list[str], min_severity: str, email: str | None, quiet: QuietHours | None, username: str
) -> Preferences:
    """Preferences from the wire, checked; 400 naming the bad field."""
    for channel in channels:
        if channel not in PERSONAL_CHANNELS:
            raise InvalidRequest(
                f"`channels` may hold {' and '.join(PERSONAL_CHANNELS)}, not {channel!r} "
                "(webhooks are the tenant's: POST /v1/notifications/webhooks)",
                param="channels",
            )
    if min_severity not in SEVERITIES:
        raise InvalidRequest(
            f"`min_severity` must be one of {', '.join(SEVERITIES)}, not {min_severity!r}",
            param="min_severity",
        )
    if email is not None and not _looks_like_email(email):
        raise InvalidRequest(f"`email` {email[:80]!r} is not an email address", param="email")
    result = Preferences(tuple(dict.fromkeys(channels)), min_severity, email, quiet)
    if "email" in result.channels and email_of(result, username) is None:
        raise InvalidRequest(
            "the email channel needs an address: set `email` (your username is not an address)", param="email"
        )
    return result


def _of(row: Preference | None) -> Preferences:
    if row is None:
        return DEFAULT
    quiet = None
    if row.quiet_start and row.quiet_end and row.time_zone:
        quiet = QuietHours(
            time.fromisoformat(row.quiet_start), time.fromisoformat(row.quiet_end), row.time_zone
        )
    return Preferences(tuple(row.channels), row.min_severity, row.email, quiet)


async def preferences_of(
    session: AsyncSession, tenant_id: str, user_ids: list[str]
) -> dict[str, Preferences]:
    """Each user's preferences (the defaults for those who set none)."""
    found: dict[str, Preferences] = dict.fromkeys(user_ids, DEFAULT)
    if user_ids:
        rows = await session.scalars(
            select(Preference).where(Preference.tenant_id == tenant_id, Preference.user_id.in_(user_ids))
        )
        for row in rows:
            found[row.user_id] = _of(row)
    return found


async def read_preferences(session: AsyncSession, tenant_id: str, user_id: str) -> Preferences:
    """One user's preferences."""
    return (await preferences_of(session, tenant_id, [user_id]))[user_id]


async def save_preferences(session: AsyncSession, tenant_id: str, user_id: str, chosen: Preferences) -> None:
    """Replace a user's preferences (the caller commits)."""
    row = await session.get(Preference, (tenant_id, user_id))
    if row is None:
        row = Preference(tenant_id=tenant_id, user_id=user_id)
        session.add(row)
    row.channels = list(chosen.channels)
    row.min_severity = chosen.min_severity
    row.email = chosen.email
    quiet = chosen.quiet
    row.quiet_start = clock_text(quiet.start) if quiet else None
    row.quiet_end = clock_text(quiet.end) if quiet else None
    row.time_zone = quiet.time_zone if quiet else None
    row.updated_at = utcnow()
