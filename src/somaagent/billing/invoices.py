"""A tenant's invoice for one calendar month (UTC): lines per model/tool from the daily rollups, the
month's corrections listed, totals, a stable number; and its printable HTML.

Owns: `Invoice`, `InvoiceLine`, `parse_month`, `build_invoice`, `invoice_html`. May import: core, billing.
Never: reads raw ledger rows for a total (only the month's corrections are listed from the ledger).
"""

from __future__ import annotations

import hashlib
import html
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.billing.money import usd
from somaagent.billing.summary import month_lines
from somaagent.billing.tables import LedgerEntry
from somaagent.core.errors import InvalidRequest

_MONTH = re.compile(r"(\d{4})-(\d{2})")
MAX_LISTED_CORRECTIONS = 1000


@dataclass(frozen=True, slots=True)
class InvoiceLine:
    """What one model or tool cost in the month."""

    kind: str
    item: str
    quantity: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    amount_micros: int


@dataclass(frozen=True, slots=True)
class Invoice:
    """One tenant's month. `status` is `open` until the month has ended, then `closed` (a closed invoice
    is the same every time it is read, unless a correction is posted into that month: none can be, they
    are dated when posted)."""

    number: str
    tenant_id: str
    tenant_name: str
    month: str
    period_start: datetime
    period_end: datetime
    status: str
    issued_at: datetime
    lines: list[InvoiceLine]
    corrections: list[LedgerEntry]
    subtotal_micros: int
    corrections_micros: int
    total_micros: int


def parse_month(value: str, now: datetime) -> tuple[datetime, datetime]:
    """The UTC bounds `[start, end)` of `YYYY-MM`; 400 naming `month` if malformed or in the future."""
    match = _MONTH.fullmatch(value)
    if match is None or not 1 <= int(match.group(2)) <= 12 or int(match.group(1)) < 1:
        raise InvalidRequest(f"`month` must be YYYY-MM, such as 2025-01, not {value!r}", param="month")
    year, month = int(match.group(1)), int(match.group(2))
    start = datetime(year, month, 1, tzinfo=UTC)
    if start > now:
        raise InvalidRequest(
            f"`month` {value} has not started yet; invoices exist for this month and earlier ones",
            param="month",
        )
    end = datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=UTC)
    return start, end


def invoice_number(tenant_id: str, start: datetime) -> str:
    """Stable for a tenant and month: `INV-202501-<8 hex of the tenant>`."""
    return f"INV-{start:%Y%m}-{hashlib.sha256(tenant_id.encode()).hexdigest()[:8].upper()}"


async def build_invoice(
    session: AsyncSession, tenant_id: str, tenant_name: str, month: str, now: datetime
) -> Invoice:
    """The tenant's invoice for `month` (`YYYY-MM`); an empty month has no lines and totals of 0."""
    start, end = parse_month(month, now)
    lines = []
    corrections_micros = 0
    for row in await month_lines(session, tenant_id, start, end):
        if row.kind == "correction":
            corrections_micros += row.totals.amount_micros
            continue
        t = row.totals
        lines.append(
            InvoiceLine(
                str(row.kind),
                str(row.group),
                t.requests,
                t.prompt_tokens,
                t.completion_tokens,
                t.cached_tokens,
                t.amount_micros,
            )
        )
    corrections = list(
        (
            await session.scalars(
                select(LedgerEntry)
                .where(
                    LedgerEntry.tenant_id == tenant_id,
                    LedgerEntry.kind == "correction",
                    LedgerEntry.occurred_at >= start,
                    LedgerEntry.occurred_at < end,
                )
                .order_by(LedgerEntry.occurred_at, LedgerEntry.id)
                .limit(MAX_LISTED_CORRECTIONS)
            )
        ).all()
    )
    subtotal = sum(line.amount_micros for line in lines)
    return Invoice(
        number=invoice_number(tenant_id, start),
        tenant_id=tenant_id,
        tenant_name=tenant_name,
        month=f"{start:%Y-%m}",
        period_start=start,
        period_end=end,
        status="closed" if now >= end else "open",
        issued_at=min(now, end),
        lines=lines,
        corrections=corrections,
        subtotal_micros=subtotal,
        corrections_micros=corrections_micros,
        total_micros=subtotal + corrections_micros,
    )


def invoice_html(invoice: Invoice) -> str:
    """A simple printable page; every value is escaped."""
    e = html.escape

    def row(*cells: object, tag: str = "td") -> str:
        return "<tr>" + "".join(f"<{tag}>{e(str(c))}</{tag}>" for c in cells) + "</tr>"

    lines = "".join(
        row(
            line.kind,
            line.item,
            line.quantity,
            line.prompt_tokens,
            line.completion_tokens,
            line.cached_tokens,
            usd(line.amount_micros),
        )
        for line in invoice.lines
    ) or row("—", "no usage this month", 0, 0, 0, 0, usd(0))
    corrections = "".join(
        row(c.occurred_at.isoformat(), c.corrects or "", c.item, c.reason or "", usd(c.amount_micros))
        for c in invoice.corrections
    )
    corrections_table = (
        "<h2>Corrections</h2><table>"
        + row("date", "corrects", "model/tool", "reason", "amount (USD)", tag="th")
        + corrections
        + "</table>"
        if corrections
        else ""
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Invoice {e(invoice.number)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #999;padding:.3em .6em;text-align:left}}</style></head>
<body><h1>Invoice {e(invoice.number)}</h1>
<p>Tenant: {e(invoice.tenant_name)} ({e(invoice.tenant_id)})<br>
Period: {e(invoice.period_start.date().isoformat())} to {e(invoice.period_end.date().isoformat())} (UTC,
end exclusive)<br>Status: {e(invoice.status)}<br>Issued: {e(invoice.issued_at.isoformat())}</p>
<table>{
        row(
            "kind",
            "model/tool",
            "calls",
            "prompt tokens",
            "completion tokens",
            "cached tokens",
            "amount (USD)",
            tag="th",
        )
    }{lines}</table>
{corrections_table}
<table>{row("Subtotal", usd(invoice.subtotal_micros))}{row("Corrections", usd(invoice.corrections_micros))}
{row("Total (USD)", usd(invoice.total_micros))}</table>
</body></html>
"""
