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


# Bounds outside these years describe no event and would overflow the date arithmetic of the ranges
# built from them (a default window before `until`, a day after `since`): refused, not a 500.
_EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
_LATEST = datetime(9000, 1, 1, tzinfo=UTC)


def parse_bound(value: str | None, param: str) -> datetime | None:
    """A time bound: RFC 3339 with a zone, or a date `YYYY-MM-DD` (its 00:00 UTC), from 1970 to 8999;
    400 naming `param`."""
    if value is None:
        return None
    if _DATE.fullmatch(value):
        try:
            bound = datetime.fromisoformat(value).replace(tzinfo=UTC)
        except ValueError as exc:
            raise InvalidRequest(f"`{param}` {value!r} is not a valid date", param=param) from exc
    else:
        bound = parse_timestamp(value, param)
    if not _EARLIEST <= bound < _LATEST:
        raise InvalidRequest(f"`{param}` {value!r} must be between 1970 and 8999", param=param)
    return bound


def parse_range(since: str | None, until: str | None) -> tuple[datetime | None, datetime | None]:
    """`[since, until)`, with `until` after `since`."""
    start, end = parse_bound(since, "since"), parse_bound(until, "until")
    if start is not None and end is not None and start >= end:
        raise InvalidRequest("`until` must be later than `since`", param="until")
    return start, end


async def acting_tenant(session: AsyncSession, principal: Principal, tenant: str | None) -> Principal:
    """The caller acting for `?tenant=` (operators: any tenant; others: only their own, else 404)."""
    return await act_for_tenant(session, principal, tenant)
