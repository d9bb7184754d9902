"""Billing totals from the rollups only (never the raw ledger): per model/tool, key, user or day, over a
time range on hour boundaries (daily buckets when the range is whole days).

Owns: `Totals`, `SummaryRow`, `summarize`, `month_lines`. May import: core, billing.tables.
Never: scans ledger rows for totals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.billing.entries import bucket_start
from somaagent.billing.tables import BillingRollup
from somaagent.core.errors import InvalidRequest

GROUPS = ("model", "key", "user", "day")


@dataclass(slots=True)
class Totals:
    """Sums over some ledger entries."""

    entries: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    amount_micros: int = 0

    def add(self, other: Totals) -> None:
        """Add `other` into these totals."""
        self.entries += other.entries
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cached_tokens += other.cached_tokens
        self.amount_micros += other.amount_micros


@dataclass(slots=True)
class SummaryRow:
    """One group: `group` is the model/tool, key id, user id or UTC day (null: no key / no user);
    `kind` is set when grouping by model (model, tool or correction)."""

    group: str | None
    kind: str | None
    totals: Totals = field(default_factory=Totals)


_SUMS = (
    func.sum(BillingRollup.entries),
    func.sum(BillingRollup.requests),
    func.sum(BillingRollup.prompt_tokens),
    func.sum(BillingRollup.completion_tokens),
    func.sum(BillingRollup.cached_tokens),
    func.sum(BillingRollup.amount_micros),
)


def _totals(values: Sequence[Any]) -> Totals:
    return Totals(*(int(v or 0) for v in values))


def period_for(since: datetime | None, until: datetime | None) -> str:
    """The rollup period that answers `[since, until)` exactly: `day` for whole days, else `hour`;
    400 naming the bound that is not on an hour."""
    for name, bound in (("since", since), ("until", until)):
        if bound is not None and bound != bucket_start("hour", bound):
            raise InvalidRequest(
                f"`{name}` {bound.isoformat()} is not on the hour: billing totals come from hourly "
                "rollups, so give a time such as 2025-01-31T13:00:00Z (or a whole day)",
                param=name,
            )
    whole_days = all(b is None or b == bucket_start("day", b) for b in (since, until))
    return "day" if whole_days else "hour"


async def summarize(
    session: AsyncSession, tenant_id: str, group_by: str, since: datetime | None, until: datetime | None
) -> list[SummaryRow]:
    """The tenant's totals in `[since, until)` grouped by `group_by`, ordered by group."""
    if group_by not in GROUPS:
        raise InvalidRequest(
            f"`group_by` must be one of {', '.join(GROUPS)}, not {group_by!r}", param="group_by"
        )
    period = period_for(since, until)
    groupings: dict[str, list[Any]] = {
        "model": [BillingRollup.item, BillingRollup.kind],
        "key": [BillingRollup.key_id],
        "user": [BillingRollup.user_id],
        "day": [BillingRollup.bucket],
    }
    columns = groupings[group_by]
    query = (
        select(*columns, *_SUMS)
        .where(BillingRollup.tenant_id == tenant_id, BillingRollup.period == period)
        .group_by(*columns)
        .order_by(*columns)
    )
    if since is not None:
        query = query.where(BillingRollup.bucket >= since.astimezone(UTC))
    if until is not None:
        query = query.where(BillingRollup.bucket < until.astimezone(UTC))
    rows: dict[tuple[str | None, str | None], SummaryRow] = {}
    for found in (await session.execute(query)).all():
        if group_by == "model":
            key: tuple[str | None, str | None] = (found[0], found[1])
            sums = found[2:]
        elif group_by == "day":  # hourly buckets fold into their UTC day
            key = (found[0].astimezone(UTC).date().isoformat(), None)
            sums = found[1:]
        else:
            key = (found[0] or None, None)
            sums = found[1:]
        rows.setdefault(key, SummaryRow(*key)).totals.add(_totals(sums))
    return list(rows.values())


async def month_lines(
    session: AsyncSession, tenant_id: str, start: datetime, end: datetime
) -> list[SummaryRow]:
    """The month's totals per (kind, model/tool) from the daily rollups, corrections included as their
    own kind."""
    query = (
        select(BillingRollup.item, BillingRollup.kind, *_SUMS)
        .where(
            BillingRollup.tenant_id == tenant_id,
            BillingRollup.period == "day",
            BillingRollup.bucket >= start,
            BillingRollup.bucket < end,
        )
        .group_by(BillingRollup.kind, BillingRollup.item)
        .order_by(BillingRollup.kind, BillingRollup.item)
    )
    return [SummaryRow(r[0], r[1], _totals(r[2:])) for r in (await session.execute(query)).all()]
