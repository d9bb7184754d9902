"""Reading the ledger: one tenant's entries, filtered, paged in a stable order (occurred_at, then id)
with an opaque keyset cursor; batches for streamed exports.

Owns: `LedgerFilter`, `LedgerPage`, `list_entries`, `get_entry`, cursors. May import: core, billing.tables.
Never: totals (those come from the rollups), another tenant's rows.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Select, and_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.billing.tables import LedgerEntry
from somaagent.core.errors import InvalidRequest, NotFound

MAX_LIMIT = 500
DEFAULT_LIMIT = 100
KINDS = ("model", "tool", "correction")
_CURSOR_PREFIX = "lc_"


@dataclass(frozen=True, slots=True)
class LedgerCursor:
    """A position in the ledger: the last entry seen."""

    occurred_at: datetime
    id: str


@dataclass(frozen=True, slots=True)
class LedgerFilter:
    """Which entries of `tenant_id`: `since` inclusive, `until` exclusive; `item` a model id or tool name."""

    tenant_id: str
    since: datetime | None = None
    until: datetime | None = None
    item: str | None = None
    kind: str | None = None
    key_id: str | None = None


@dataclass(frozen=True, slots=True)
class LedgerPage:
    """Entries oldest first; while `has_more`, `next_after` as `after` reads the next page."""

    entries: list[LedgerEntry]
    has_more: bool
    next_after: str | None


def encode_cursor(cursor: LedgerCursor) -> str:
    """The opaque `next_after` string for a position."""
    raw = f"{cursor.occurred_at.astimezone(UTC).isoformat()}|{cursor.id}".encode()
    return _CURSOR_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(value: str) -> LedgerCursor:
    """The position in a cursor from `encode_cursor`; 400 naming `after` for anything else."""
    invalid = InvalidRequest(
        f"`after` {value!r} is not a cursor this server issued; pass `next_after` from the previous page",
        param="after",
    )
    if not value.startswith(_CURSOR_PREFIX):
        raise invalid
    body = value[len(_CURSOR_PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()
        when, _, entry_id = raw.partition("|")
        occurred_at = datetime.fromisoformat(when)
        if not entry_id or occurred_at.tzinfo is None:
            raise invalid
        return LedgerCursor(occurred_at.astimezone(UTC), entry_id)
    except (binascii.Error, UnicodeDecodeError, ValueError, OverflowError) as exc:
        raise invalid from exc


def _filtered(where: LedgerFilter) -> Select[LedgerEntry]:
    if where.kind is not None and where.kind not in KINDS:
        raise InvalidRequest(f"`kind` must be one of {', '.join(KINDS)}, not {where.kind!r}", param="kind")
    query = select(LedgerEntry).where(LedgerEntry.tenant_id == where.tenant_id)
    if where.since is not None:
        query = query.where(LedgerEntry.occurred_at >= where.since.astimezone(UTC))
    if where.until is not None:
        query = query.where(LedgerEntry.occurred_at < where.until.astimezone(UTC))
    if where.item is not None:
        query = query.where(LedgerEntry.item == where.item)
    if where.kind is not None:
        query = query.where(LedgerEntry.kind == where.kind)
    if where.key_id is not None:
        query = query.where(LedgerEntry.key_id == where.key_id)
    return query


async def list_entries(
    session: AsyncSession, where: LedgerFilter, limit: int = DEFAULT_LIMIT, after: LedgerCursor | None = None
) -> LedgerPage:
    """Entries matching `where`, oldest first, at most `limit` after `after`."""
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidRequest(f"`limit` must be between 1 and {MAX_LIMIT}, not {limit}", param="limit")
    query = _filtered(where).order_by(LedgerEntry.occurred_at, LedgerEntry.id).limit(limit + 1)
    if after is not None:
        at = after.occurred_at.astimezone(UTC)
        query = query.where(
            or_(LedgerEntry.occurred_at > at, and_(LedgerEntry.occurred_at == at, LedgerEntry.id > after.id))
        )
    rows = list((await session.scalars(query)).all())
    page = rows[:limit]
    has_more = len(rows) > limit
    next_after = encode_cursor(LedgerCursor(page[-1].occurred_at, page[-1].id)) if has_more else None
    return LedgerPage(page, has_more, next_after)


async def get_entry(session: AsyncSession, tenant_id: str, entry_id: str) -> LedgerEntry:
    """One entry of the tenant's ledger; 404 if the tenant has none with that id."""
    entry = await session.scalar(
        select(LedgerEntry).where(LedgerEntry.tenant_id == tenant_id, LedgerEntry.id == entry_id)
    )
    if entry is None:
        raise NotFound(f"no ledger entry {entry_id!r} in this tenant", param="entry_id")
    return entry
