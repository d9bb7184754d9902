"""Corrections: a signed amount against an earlier ledger entry, appended as a new entry (the ledger is
never updated), audited, and idempotent by an optional client key.

Owns: `post_correction`. May import: core, events, billing. Never: changes the corrected entry.
"""

from __future__ import annotations

import hashlib

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.billing.entries import NewEntry, append_entries
from somaagent.billing.ledger import get_entry
from somaagent.billing.tables import LedgerEntry
from somaagent.core.clock import utcnow
from somaagent.core.errors import InvalidRequest
from somaagent.core.ids import new_id
from somaagent.events.outbox import audit

MAX_AMOUNT = 2**53
MAX_REASON = 500


def _source_id(tenant_id: str, idempotency_key: str) -> str:
    """The ledger's unique source id for a correction sent with `idempotency_key` (per tenant)."""
    return "corr_" + hashlib.sha256(f"{tenant_id}\0{idempotency_key}".encode()).hexdigest()[:40]


async def post_correction(
    session: AsyncSession,
    actor: str,
    tenant_id: str,
    entry_id: str,
    amount_micros: int,
    reason: str,
    idempotency_key: str | None = None,
) -> tuple[LedgerEntry, bool]:
    """Append a correction of `entry_id` by `amount_micros` (negative: a credit); returns the entry and
    whether it is new (a repeated `idempotency_key` returns the first one). The caller commits."""
    reason = reason.strip()
    if not reason or len(reason) > MAX_REASON:
        raise InvalidRequest(f"`reason` is 1 to {MAX_REASON} characters: say why", param="reason")
    if amount_micros == 0 or abs(amount_micros) > MAX_AMOUNT:
        raise InvalidRequest(
            f"`amount_micros` is a non-zero whole number of micro-USD within ±{MAX_AMOUNT} "
            "(negative credits the tenant)",
            param="amount_micros",
        )
    source = _source_id(tenant_id, idempotency_key) if idempotency_key else None
    if source is not None:
        earlier = await session.scalar(
            select(LedgerEntry).where(
                LedgerEntry.tenant_id == tenant_id, LedgerEntry.source_event_id == source
            )
        )
        if earlier is not None:
            return earlier, False
    # Corrections of one entry queue here, each seeing what the ones before it credited (PostgreSQL
    # locks the row; SQLite has one writer, and the check after the insert below covers it).
    await session.execute(
        select(LedgerEntry.id)
        .where(LedgerEntry.tenant_id == tenant_id, LedgerEntry.id == entry_id)
        .with_for_update()
    )
    original = await get_entry(session, tenant_id, entry_id)
    if original.kind == "correction":
        raise InvalidRequest(
            f"{entry_id} is itself a correction; correct the entry it corrects ({original.corrects})",
            param="entry_id",
        )
    net = original.amount_micros + await _corrected(session, tenant_id, entry_id)
    if net + amount_micros < 0:
        raise _credits_too_much(amount_micros, entry_id, net)
    now = utcnow()
    entry = NewEntry(
        id=new_id("led"),
        tenant_id=tenant_id,
        source_event_id=source,
        request_id=original.request_id,
        occurred_at=now,
        kind="correction",
        item=original.item,
        status="ok",
        key_id=original.key_id,
        subject=original.subject,
        user_id=original.user_id,
        prompt_tokens=0,
        completion_tokens=0,
        cached_tokens=0,
        quantity=0,
        amount_micros=amount_micros,
        priced=True,
        price_version=None,
        corrects=entry_id,
        reason=reason,
        recorded_by=actor[:255],
        recorded_at=now,
    )
    inserted = await append_entries(session, [entry])
    if not inserted:  # the same idempotency key, sent concurrently, won the insert
        found = await session.scalar(select(LedgerEntry).where(LedgerEntry.source_event_id == source))
        if found is None:
            raise InvalidRequest("the correction could not be recorded; send it again", param="entry_id")
        return found, False
    # On SQLite the checks above may have read before a concurrent correction committed; this one runs
    # holding the write lock, so it sees them all (the caller rolls back, dropping this entry).
    net_after = original.amount_micros + await _corrected(session, tenant_id, entry_id)
    if net_after < 0:
        raise _credits_too_much(amount_micros, entry_id, net_after - amount_micros)
    audit(
        session,
        actor,
        tenant_id,
        "billing.correction_created",
        entry_id=entry.id,
        corrects=entry_id,
        amount_micros=amount_micros,
        reason=reason,
    )
    return await get_entry(session, tenant_id, entry.id), True


async def _corrected(session: AsyncSession, tenant_id: str, entry_id: str) -> int:
    """The sum of the corrections of `entry_id` so far."""
    total = await session.scalar(
        select(func.coalesce(func.sum(LedgerEntry.amount_micros), 0)).where(
            LedgerEntry.tenant_id == tenant_id, LedgerEntry.corrects == entry_id
        )
    )
    return int(total or 0)


def _credits_too_much(amount_micros: int, entry_id: str, net: int) -> InvalidRequest:
    return InvalidRequest(
        f"a correction of {amount_micros} would credit more than {entry_id} now charges ({net} micro-USD)",
        param="amount_micros",
    )
