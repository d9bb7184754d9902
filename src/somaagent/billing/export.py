"""Exporting the ledger: entries as flat records (integer micro-USD plus an exact USD string), read in
keyset batches through short sessions and written as CSV (with a header) or one JSON array, chunk by
chunk, so memory stays constant however long the ledger is.

Owns: `EXPORT_COLUMNS`, `entry_record`, `export_chunks`. May import: core, billing.
Never: holds a transaction open for the whole export.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.billing.ledger import MAX_LIMIT, LedgerCursor, LedgerFilter, list_entries
from somaagent.billing.money import usd
from somaagent.billing.tables import LedgerEntry

FORMATS = ("json", "csv")
EXPORT_COLUMNS = (
    "id",
    "tenant_id",
    "occurred_at",
    "recorded_at",
    "kind",
    "item",
    "status",
    "request_id",
    "source_event_id",
    "key_id",
    "subject",
    "user_id",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "quantity",
    "amount_micros",
    "amount_usd",
    "priced",
    "price_version",
    "corrects",
    "reason",
    "recorded_by",
)


def entry_record(entry: LedgerEntry) -> dict[str, Any]:
    """An entry as a flat, JSON-ready record (the API's and the export's shape)."""
    return {
        "id": entry.id,
        "tenant_id": entry.tenant_id,
        "occurred_at": entry.occurred_at.isoformat(),
        "recorded_at": entry.recorded_at.isoformat(),
        "kind": entry.kind,
        "item": entry.item,
        "status": entry.status,
        "request_id": entry.request_id,
        "source_event_id": entry.source_event_id,
        "key_id": entry.key_id,
        "subject": entry.subject,
        "user_id": entry.user_id,
        "prompt_tokens": entry.prompt_tokens,
        "completion_tokens": entry.completion_tokens,
        "cached_tokens": entry.cached_tokens,
        "quantity": entry.quantity,
        "amount_micros": entry.amount_micros,
        "amount_usd": usd(entry.amount_micros),
        "priced": entry.priced,
        "price_version": entry.price_version,
        "corrects": entry.corrects,
        "reason": entry.reason,
        "recorded_by": entry.recorded_by,
    }


async def _batches(
    sessions: async_sessionmaker[AsyncSession], where: LedgerFilter
) -> AsyncIterator[list[LedgerEntry]]:
    after: LedgerCursor | None = None
    while True:
        async with sessions() as session:  # one short read per batch, none held across the stream
            page = await list_entries(session, where, MAX_LIMIT, after)
        if page.entries:
            yield page.entries
        if not page.has_more:
            return
        last = page.entries[-1]
        after = LedgerCursor(last.occurred_at, last.id)


def _csv_line(values: list[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow(values)
    return buffer.getvalue()


# Columns whose text comes from callers (model names, request ids, a correction's reason): a cell that
# starts like a formula gets a leading quote, the OWASP advice against CSV injection, so
# `=HYPERLINK(...)` never runs in whoever opens the export. Numbers, negative ones included, stay as
# they are.
_CALLER_TEXT = frozenset({"item", "status", "request_id", "subject", "reason", "recorded_by"})
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _csv_value(column: str, value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if column in _CALLER_TEXT and isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


async def export_chunks(
    sessions: async_sessionmaker[AsyncSession], where: LedgerFilter, fmt: str
) -> AsyncIterator[bytes]:
    """The matching entries, oldest first, as CSV (header row first) or one JSON array, in chunks."""
    if fmt == "csv":
        yield _csv_line(list(EXPORT_COLUMNS)).encode()
        async for batch in _batches(sessions, where):
            yield "".join(
                _csv_line([_csv_value(c, entry_record(e)[c]) for c in EXPORT_COLUMNS]) for e in batch
            ).encode()
        return
    yield b"["
    first = True
    async for batch in _batches(sessions, where):
        body = b",".join(orjson.dumps(entry_record(e)) for e in batch)
        yield body if first else b"," + body
        first = False
    yield b"]"
