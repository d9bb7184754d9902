"""Moderation strikes: repeated denials of one subject count up in a window and lock the subject out.

Owns: `moderation_strikes`. May import: core, db, events, policy. Never: api.

Counts live in the database and change by conditional statements, so every replica sees one count.
Whether a subject is locked is read on every evaluation; replicas cache the answer for `ttl_s`, so a
lockout (or an admin's reset) reaches every replica within that time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.core.clock import utcnow
from somaagent.core.errors import NotFound
from somaagent.core.principal import Principal
from somaagent.events.outbox import audit
from somaagent.policy.document import ModerationSettings
from somaagent.policy.tables import ModerationStrike


@dataclass(frozen=True, slots=True)
class StrikeState:
    """A subject's strikes as admins see them."""

    subject: str
    count: int
    window_started_at: datetime
    locked_until: datetime | None


class Strikes:
    """Counts denials per (tenant, subject) and answers whether a subject is locked out."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], ttl_s: float) -> None:
        self._sessions = sessions
        self._ttl_s = ttl_s
        self._locks: dict[tuple[str, str], tuple[float, datetime | None]] = {}

    async def locked_until(self, tenant_id: str, subject: str) -> datetime | None:
        """When the subject's lockout ends, or None if it is not locked."""
        key = (tenant_id, subject)
        cached = self._locks.get(key)
        now = time.monotonic()
        if cached is None or now - cached[0] >= self._ttl_s:
            async with self._sessions() as session:
                until = await session.scalar(
                    select(ModerationStrike.locked_until).where(
                        ModerationStrike.tenant_id == tenant_id, ModerationStrike.subject == subject
                    )
                )
            cached = (now, until)
            self._locks[key] = cached
        until = cached[1]
        return until if until is not None and until > utcnow() else None

    async def count_denial(self, tenant_id: str, subject: str, settings: ModerationSettings) -> StrikeState:
        """Add one strike; at the threshold within the window, lock the subject for `lockout_s`."""
        now = utcnow()
        window_start = now - timedelta(seconds=settings.window_s)
        async with self._sessions() as session, session.begin():
            # A window that has passed, or a lockout served, starts again at one; otherwise count up (one
            # statement each, so concurrent denials on several replicas all count).
            restarted = await session.execute(
                update(ModerationStrike)
                .where(
                    ModerationStrike.tenant_id == tenant_id,
                    ModerationStrike.subject == subject,
                    or_(
                        ModerationStrike.window_started_at < window_start,
                        ModerationStrike.locked_until < now,
                    ),
                )
                .values(count=1, window_started_at=now, locked_until=None, updated_at=now)
            )
            if restarted.rowcount == 0:  # type: ignore[attr-defined]
                counted = await session.execute(
                    update(ModerationStrike)
                    .where(ModerationStrike.tenant_id == tenant_id, ModerationStrike.subject == subject)
                    .values(count=ModerationStrike.count + 1, updated_at=now)
                )
                if counted.rowcount == 0:  # type: ignore[attr-defined]
                    await _first_strike(session, tenant_id, subject, now)
            row = await session.get(ModerationStrike, (tenant_id, subject), populate_existing=True)
            assert row is not None
            if row.count >= settings.threshold and (row.locked_until is None or row.locked_until < now):
                row.locked_until = now + timedelta(seconds=settings.lockout_s)
                audit(
                    session,
                    "policy",
                    tenant_id,
                    "moderation.locked",
                    subject=subject,
                    strikes=row.count,
                    locked_until=row.locked_until.isoformat(),
                )
            state = _state(row)
        self._locks[(tenant_id, subject)] = (time.monotonic(), state.locked_until)
        return state

    async def list(self, tenant_id: str) -> list[StrikeState]:
        """The tenant's subjects with strikes, most recent first."""
        async with self._sessions() as session:
            rows = (
                await session.scalars(
                    select(ModerationStrike)
                    .where(ModerationStrike.tenant_id == tenant_id)
                    .order_by(ModerationStrike.updated_at.desc())
                )
            ).all()
        return [_state(r) for r in rows]

    async def reset(self, principal: Principal, subject: str) -> StrikeState:
        """An admin forgives a subject: strikes and lockout cleared, audited."""
        async with self._sessions() as session, session.begin():
            row = await session.get(ModerationStrike, (principal.tenant_id, subject))
            if row is None:
                raise NotFound(f"{subject!r} has no strikes", param="subject")
            state = _state(row)
            await session.execute(
                delete(ModerationStrike).where(
                    ModerationStrike.tenant_id == principal.tenant_id, ModerationStrike.subject == subject
                )
            )
            audit(
                session,
                principal.subject,
                principal.tenant_id,
                "moderation.reset",
                subject=subject,
                strikes=state.count,
            )
        self._locks.pop((principal.tenant_id, subject), None)
        return state


async def _first_strike(session: AsyncSession, tenant_id: str, subject: str, now: datetime) -> None:
    try:
        async with session.begin_nested():
            session.add(
                ModerationStrike(
                    tenant_id=tenant_id,
                    subject=subject,
                    count=1,
                    window_started_at=now,
                    locked_until=None,
                    updated_at=now,
                )
            )
    except IntegrityError:  # another replica wrote the first strike at the same moment: count on it
        await session.execute(
            update(ModerationStrike)
            .where(ModerationStrike.tenant_id == tenant_id, ModerationStrike.subject == subject)
            .values(count=ModerationStrike.count + 1, updated_at=now)
        )


def _state(row: ModerationStrike) -> StrikeState:
    return StrikeState(row.subject, row.count, row.window_started_at, row.locked_until)
