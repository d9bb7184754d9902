"""Reading the audit log: tenant-scoped, filtered, paged in a stable order (occurred_at, then id)."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import and_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.audit.tables import AuditRecord
from somaagent.core.errors import InvalidRequest, NotFound
from somaagent.core.principal import Principal

MAX_LIMIT = 500
DEFAULT_LIMIT = 100
# Marks a cursor minted by `encode_cursor`; anything else given as `after` is taken for an event id.
_CURSOR_PREFIX = "cur_"


@dataclass(frozen=True, slots=True)
class AuditCursor:
    """A position in the log: the last row seen."""

    occurred_at: datetime
    id: str


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """What to read. `tenant_id=None` means the caller's tenant, or every tenant for an operator."""

    tenant_id: str | None = None
    type: str | None = None  # exact, or a prefix when it ends with "." ("auth.")
    actor: str | None = None
    since: datetime | None = None  # inclusive
    until: datetime | None = None  # exclusive


@dataclass(frozen=True, slots=True)
class AuditPage:
    """One page of records, oldest first; while `has_more`, `next_after` (the position of the last one)
    as `after` reads the next page. Not a tail: an event is ordered by when it happened, and may reach
    the log a moment after later ones, so re-read from a time (`since`) to catch up."""

    records: list[AuditRecord]
    has_more: bool
    next_after: str | None


def encode_cursor(cursor: AuditCursor) -> str:
    """The opaque `next_after` string for a position."""
    raw = f"{cursor.occurred_at.astimezone(UTC).isoformat()}|{cursor.id}".encode()
    return _CURSOR_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(value: str) -> AuditCursor | None:
    """The position in a cursor from `encode_cursor`; None if `value` is not one (it may be an id)."""
    if not value.startswith(_CURSOR_PREFIX):
        return None
    body = value[len(_CURSOR_PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()
        when, _, record_id = raw.partition("|")
        occurred_at = datetime.fromisoformat(when)
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequest(
            f"`after` {value!r} is not a cursor this server issued; pass `next_after` from the previous "
            "page, or the id of the last event you saw",
            param="after",
        ) from exc
    if not record_id or occurred_at.tzinfo is None:
        raise InvalidRequest(f"`after` {value!r} is not a valid cursor", param="after")
    try:
        occurred_at = occurred_at.astimezone(UTC)
    except OverflowError as exc:  # year 1 or 9999 pushed past the calendar by its offset
        raise InvalidRequest(f"`after` {value!r} is not a valid cursor", param="after") from exc
    return AuditCursor(occurred_at, record_id)


def parse_timestamp(value: str, param: str) -> datetime:
    """An RFC 3339 timestamp (with a zone: `Z` or `+02:00`), in UTC; 400 naming `param` otherwise."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise InvalidRequest(
            f"`{param}` must be an RFC 3339 timestamp such as 2025-01-31T12:00:00Z, not {value!r}",
            param=param,
        ) from exc
    if parsed.tzinfo is None:
        raise InvalidRequest(
            f"`{param}` {value!r} has no time zone; add `Z` (UTC) or an offset such as +02:00", param=param
        )
    # SQLite stores timestamps without their zone: compare in UTC, as they were written.
    try:
        return parsed.astimezone(UTC)
    except OverflowError as exc:  # 0001-01-01T00:00+01:00 is before the first representable instant
        raise InvalidRequest(f"`{param}` {value!r} is outside the representable range", param=param) from exc


def _scope(principal: Principal, tenant_id: str | None) -> str | None:
    """The tenant to filter on, or None for every tenant (the operator only)."""
    if tenant_id is None:
        return None if principal.is_admin else principal.tenant_id
    if not principal.can_act_for(tenant_id):
        raise NotFound(f"no tenant {tenant_id!r}", param="tenant")
    return tenant_id


async def resolve_after(session: AsyncSession, principal: Principal, value: str) -> AuditCursor:
    """The position `after` names: a cursor, or the id of an event the caller can see."""
    cursor = decode_cursor(value)
    if cursor is not None:
        return cursor
    query = select(AuditRecord.occurred_at, AuditRecord.id).where(AuditRecord.id == value)
    scope = _scope(principal, None)
    if scope is not None:
        query = query.where(AuditRecord.tenant_id == scope)
    found = (await session.execute(query)).first()
    if found is None:
        raise InvalidRequest(
            f"`after` {value!r} is neither a cursor nor the id of an audit event you can see",
            param="after",
        )
    return AuditCursor(found[0], found[1])


async def list_audit(
    session: AsyncSession,
    principal: Principal,
    where: AuditFilter,
    limit: int = DEFAULT_LIMIT,
    after: AuditCursor | None = None,
) -> AuditPage:
    """Audit records the caller may see that match `where`, oldest first, `limit` after `after`."""
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidRequest(f"`limit` must be between 1 and {MAX_LIMIT}, not {limit}", param="limit")
    query = select(AuditRecord).order_by(AuditRecord.occurred_at, AuditRecord.id).limit(limit + 1)
    scope = _scope(principal, where.tenant_id)
    if scope is not None:
        query = query.where(AuditRecord.tenant_id == scope)
    if where.type is not None:
        if where.type.endswith("."):
            query = query.where(AuditRecord.type.startswith(where.type, autoescape=True))
        else:
            query = query.where(AuditRecord.type == where.type)
    if where.actor is not None:
        query = query.where(AuditRecord.actor == where.actor)
    if where.since is not None:
        query = query.where(AuditRecord.occurred_at >= where.since.astimezone(UTC))
    if where.until is not None:
        query = query.where(AuditRecord.occurred_at < where.until.astimezone(UTC))
    if after is not None:
        at = after.occurred_at.astimezone(UTC)
        query = query.where(
            or_(
                AuditRecord.occurred_at > at,
                and_(AuditRecord.occurred_at == at, AuditRecord.id > after.id),
            )
        )
    rows = list((await session.scalars(query)).all())
    page = rows[:limit]
    has_more = len(rows) > limit
    next_after = encode_cursor(AuditCursor(page[-1].occurred_at, page[-1].id)) if has_more else None
    return AuditPage(records=page, has_more=has_more, next_after=next_after)
