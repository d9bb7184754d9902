"""Query parameters the billing routes share: time bounds (RFC 3339 or a date) and the acting tenant."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.audit.queries import parse_timestamp
from somaagent.core.errors import InvalidRequest
from somaagent.core.principal import Principal
from somaagent.identity.service import act_for_tenant

_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def parse_bound(value: str | None, param: str) -> datetime | None:
    """A time bound: RFC 3339 with a zone, or a date `YYYY-MM-DD` (its 00:00 UTC); 400 naming `param`."""
    if value is None:
        return None
    if _DATE.fullmatch(value):
        try:
            return datetime.fromisoformat(value).replace(tzinfo=UTC)
        except ValueError as exc:
            raise InvalidRequest(f"`{param}` {value!r} is not a valid date", param=param) from exc
    return parse_timestamp(value, param)


def parse_range(since: str | None, until: str | None) -> tuple[datetime | None, datetime | None]:
    """`[since, until)`, with `until` after `since`."""
    start, end = parse_bound(since, "since"), parse_bound(until, "until")
    if start is not None and end is not None and start >= end:
        raise InvalidRequest("`until` must be later than `since`", param="until")
    return start, end


async def acting_tenant(session: AsyncSession, principal: Principal, tenant: str | None) -> Principal:
    """The caller acting for `?tenant=` (operators: any tenant; others: only their own, else 404)."""
    return await act_for_tenant(session, principal, tenant)
