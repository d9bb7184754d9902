"""Token revocations: the rows (`revoked_tokens`) and the in-process view every verification consults.

A revocation names a token (`jti`), a login family (`family`, the token's `sid`), or a subject (every
token of a user issued before a moment). The process that revokes applies it at once; the others read
new rows by `seq` on every poll.

Owns: revocation rows and the local revocation set. May import: core, db, identity.tables.
Never: verifies signatures or claims (identity/tokens.py does).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.identity.tables import RevokedToken

KINDS = ("jti", "family", "subject")
# A PostgreSQL sequence hands out numbers at insert but rows appear at commit, so a poll may see seq 11
# before seq 10. A missing number is re-read for this long before we decide its transaction rolled back.
GAP_WAIT_S = 30.0
MAX_GAPS = 1_000
POLL_BATCH = 5_000


@dataclass(frozen=True, slots=True)
class Revocation:
    """One revocation, as applied locally (times as epoch seconds)."""

    kind: str
    value: str
    revoked_at: float
    expires_at: float


def add_revocation(
    session: AsyncSession, kind: str, value: str, revoked_at: datetime, expires_at: datetime
) -> None:
    """Insert a revocation row into the caller's transaction."""
    if kind not in KINDS:
        raise ValueError(f"unknown revocation kind {kind!r}")
    session.add(RevokedToken(kind=kind, value=value, revoked_at=revoked_at, expires_at=expires_at))


async def prune_revocations(session: AsyncSession, now: datetime) -> int:
    """Delete revocations whose tokens have expired anyway. The row with the highest `seq` stays: SQLite
    would hand its number out again, and a poller that already read it would miss the new row."""
    top = await session.scalar(select(func.max(RevokedToken.seq)))
    if top is None:
        return 0
    done = await session.execute(
        delete(RevokedToken).where(RevokedToken.expires_at < now, RevokedToken.seq < top)
    )
    return int(done.rowcount)  # type: ignore[attr-defined]


class RevocationList:
    """The revocations this process enforces, and how far it has read the table."""

    def __init__(self) -> None:
        self._token_ids: dict[str, float] = {}  # jti -> expires_at
        self._families: dict[str, float] = {}  # sid -> expires_at
        self._subjects: dict[str, tuple[float, float]] = {}  # user id -> (cutoff, expires_at)
        self._top = 0  # the highest seq read
        self._gaps: dict[int, float] = {}  # seq not seen yet below _top -> monotonic time first missed
        self.loaded = False

    def apply(self, revocation: Revocation) -> None:
        """Enforce a revocation from now on (idempotent)."""
        value, expires_at = revocation.value, revocation.expires_at
        if revocation.kind == "jti":
            self._token_ids[value] = max(expires_at, self._token_ids.get(value, 0.0))
        elif revocation.kind == "family":
            self._families[value] = max(expires_at, self._families.get(value, 0.0))
        elif revocation.kind == "subject":
            cutoff, until = self._subjects.get(value, (0.0, 0.0))
            self._subjects[value] = (max(cutoff, revocation.revoked_at), max(until, expires_at))

    def reason(self, token_id: str, family_id: str | None, subject: str, issued_at: float) -> str | None:
        """Why a token is revoked, or None if it is not."""
        if token_id in self._token_ids:
            return "this token has been revoked"
        if family_id is not None and family_id in self._families:
            return "this login has been signed out (its session was revoked)"
        cutoff = self._subjects.get(subject)
        # iat carries milliseconds; a token of the same millisecond as the revocation counts as before it.
        if cutoff is not None and issued_at <= _floor_ms(cutoff[0]):
            return "every token of this user issued before a password or role change was revoked"
        return None

    def forget_expired(self, now: float) -> None:
        """Drop revocations of tokens that have expired anyway."""
        self._token_ids = {k: v for k, v in self._token_ids.items() if v > now}
        self._families = {k: v for k, v in self._families.items() if v > now}
        self._subjects = {k: v for k, v in self._subjects.items() if v[1] > now}

    async def load(self, session: AsyncSession, now: datetime) -> None:
        """Read every revocation still in force (at start)."""
        rows = await session.execute(
            select(
                RevokedToken.seq,
                RevokedToken.kind,
                RevokedToken.value,
                RevokedToken.revoked_at,
                RevokedToken.expires_at,
            ).where(RevokedToken.expires_at > now)
        )
        seen: set[int] = set()
        for seq, kind, value, revoked_at, expires_at in rows:
            self.apply(Revocation(kind, value, revoked_at.timestamp(), expires_at.timestamp()))
            seen.add(seq)
        top = await session.scalar(select(func.max(RevokedToken.seq))) or 0
        # Numbers just below the top may belong to transactions still committing: watch them a while.
        self._note_gaps(range(max(1, top - 100), top), seen)
        self._top = max(self._top, top)
        self.loaded = True

    async def poll(self, session: AsyncSession) -> int:
        """Apply rows added since the last poll (and any late commits below it); the number applied."""
        floor = min(self._gaps) - 1 if self._gaps else self._top
        rows = (
            await session.execute(
                select(
                    RevokedToken.seq,
                    RevokedToken.kind,
                    RevokedToken.value,
                    RevokedToken.revoked_at,
                    RevokedToken.expires_at,
                )
                .where(RevokedToken.seq > floor)
                .order_by(RevokedToken.seq)
                .limit(POLL_BATCH)
            )
        ).all()
        seen: set[int] = set()
        for seq, kind, value, revoked_at, expires_at in rows:
            self.apply(Revocation(kind, value, revoked_at.timestamp(), expires_at.timestamp()))
            seen.add(seq)
        top = max(seen, default=self._top)
        self._note_gaps(range(self._top + 1, top + 1), seen)
        for seq in seen:
            self._gaps.pop(seq, None)
        self._top = max(self._top, top)
        cutoff = time.monotonic() - GAP_WAIT_S
        self._gaps = {seq: since for seq, since in self._gaps.items() if since > cutoff}
        return len(rows)

    def _note_gaps(self, numbers: range, seen: set[int]) -> None:
        now = time.monotonic()
        for seq in numbers[-MAX_GAPS:]:
            if seq not in seen and seq not in self._gaps:
                self._gaps[seq] = now
        if len(self._gaps) > MAX_GAPS:
            for seq in sorted(self._gaps)[: len(self._gaps) - MAX_GAPS]:
                del self._gaps[seq]


def _floor_ms(value: float) -> float:
    return int(value * 1000) / 1000
