"""The `audit.events` consumer: each event becomes one audit_log row, however often it is delivered."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.audit.tables import AuditRecord
from somaagent.db.statements import insert_skipping_duplicates
from somaagent.events.schemas import Event


async def append_audit(session: AsyncSession, events: Sequence[Event]) -> None:
    """The `audit.events` handler: appends each event to the audit log, keyed by event id. Delivery is
    at least once, so a redelivered event must be a no-op (and the table refuses updates, so it cannot
    be an upsert either)."""
    rows = [
        {
            "id": e.id,
            "tenant_id": e.tenant_id,
            "type": e.type,
            "actor": e.actor,
            "occurred_at": e.occurred_at,
            "data": e.data,
        }
        for e in events
    ]
    if rows:
        await session.execute(insert_skipping_duplicates(session, AuditRecord.__table__, ["id"]), rows)
