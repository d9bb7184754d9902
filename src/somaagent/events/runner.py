"""Running a consumer group over delivered events: each event applied once, or dead-lettered once.

Owns: `ConsumerRunner`, the one path every adapter (in-process, Kafka, NATS) delivers through: schema
checks (events/catalog.py), the `processed_events` marks, retries, isolation of a poison event, and
dead letters (an outbox row on `<topic>.dlq`, written in the transaction that marks the event).
May import: events, db. Never: a broker client (adapters decode nothing themselves but call
`handle_payloads`), or a domain package.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.core.clock import utcnow
from somaagent.db.statements import insert_rows_skipping_duplicates
from somaagent.events import catalog
from somaagent.events.consumers import ConsumerSpec
from somaagent.events.outbox import insert_events
from somaagent.events.schemas import DEAD_LETTER_SUFFIX, Event
from somaagent.events.tables import ProcessedEvent
from somaagent.events.wire import EnvelopeInvalid, decode_event

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# Between one-by-one attempts of a failing event: long enough for a lock or a deadlock to clear.
_RETRY_PAUSE_S = 0.05
_ERROR_CHARS = 2000


class DatabaseUnusable(Exception):
    """The runner could not record an outcome (not even a dead letter): the adapter must not ack."""


@dataclass(frozen=True, slots=True)
class _Rejected:
    """A delivery that will never be applied: its mark id, tenant, error and what to keep of it."""

    event_id: str
    tenant_id: str | None
    error: str
    kept: dict[str, Any]  # {"event": envelope} or {"payload_b64": ...}


def raw_payload_id(payload: bytes) -> str:
    """The mark id of an undecodable payload: the same bytes are dead-lettered once, however often sent."""
    return "raw_" + hashlib.sha256(payload).hexdigest()[:36]


def dead_letter_event(group: str, topic: str, rejected: _Rejected) -> Event:
    """The `event.dead_lettered` event on `<topic>.dlq` for one rejected delivery."""
    return Event(
        topic=topic + DEAD_LETTER_SUFFIX,
        type=catalog.DEAD_LETTERED,
        tenant_id=rejected.tenant_id,
        actor=None,
        data={"group": group, "topic": topic, "error": rejected.error[:_ERROR_CHARS], **rejected.kept},
    )


def _rejected_event(event: Event, error: str) -> _Rejected:
    return _Rejected(event.id, event.tenant_id, error, {"event": event.to_json()})


class ConsumerRunner:
    """Delivers batches to a group's handler exactly once in effect. One per process, shared by groups."""

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], *, attempts: int, on_outbox: Callable[[], None]
    ) -> None:
        self._sessions = sessions
        self._attempts = max(1, attempts)
        self._on_outbox = on_outbox

    async def handle_events(self, spec: ConsumerSpec, topic: str, events: Sequence[Event]) -> None:
        """Apply `events` of `topic` for `spec.group` (the in-process path); returns when each one is
        applied or dead-lettered; raises `DatabaseUnusable` when neither could be recorded."""
        valid: list[Event] = []
        rejected: list[_Rejected] = []
        for event in events:
            error = catalog.check(event)
            if error is None:
                valid.append(event)
            else:
                rejected.append(_rejected_event(event, error))
        await self._run(spec, topic, valid, rejected)

    async def handle_payloads(self, spec: ConsumerSpec, topic: str, payloads: Sequence[bytes]) -> None:
        """Decode and apply broker payloads of `topic` (the broker path); an undecodable payload is
        dead-lettered with its bytes in base64. Same guarantees as `handle_events`."""
        events: list[Event] = []
        undecodable: list[_Rejected] = []
        for payload in payloads:
            try:
                events.append(decode_event(topic, payload))
            except EnvelopeInvalid as exc:
                kept = {"payload_b64": base64.b64encode(payload).decode()}
                undecodable.append(_Rejected(raw_payload_id(payload), None, f"envelope invalid: {exc}", kept))
        valid: list[Event] = []
        rejected = undecodable
        for event in events:
            error = catalog.check(event)
            if error is None:
                valid.append(event)
            else:
                rejected.append(_rejected_event(event, error))
        await self._run(spec, topic, valid, rejected)

    async def _run(
        self, spec: ConsumerSpec, topic: str, valid: list[Event], rejected: list[_Rejected]
    ) -> None:
        valid = _unique(valid, lambda e: e.id)
        rejected = _unique(rejected, lambda r: r.event_id)
        # The good case: the whole batch, its marks and its dead letters in one transaction.
        try:
            await self._apply(spec, topic, valid, rejected)
            return
        except Exception as exc:
            if not valid:
                raise DatabaseUnusable(f"could not record dead letters for {spec.group}: {exc!r}") from exc
            log.warning(
                "group %s refused a batch of %d %s events (%r); retrying one by one",
                spec.group,
                len(valid),
                topic,
                exc,
            )
        if rejected:
            await self._record(spec, topic, [], rejected)
        for event in valid:
            await self._apply_one(spec, topic, event)

    async def _apply_one(self, spec: ConsumerSpec, topic: str, event: Event) -> None:
        error: BaseException | None = None
        for attempt in range(self._attempts):
            if attempt:
                await asyncio.sleep(_RETRY_PAUSE_S * 2 ** (attempt - 1))
            try:
                await self._apply(spec, topic, [event], [])
                return
            except Exception as exc:
                error = exc
                log.warning(
                    "group %s: event %s (%s) failed attempt %d/%d: %r",
                    spec.group,
                    event.id,
                    event.type,
                    attempt + 1,
                    self._attempts,
                    exc,
                )
        await self._record(spec, topic, [], [_rejected_event(event, f"handler failed: {error!r}")])

    async def _record(
        self, spec: ConsumerSpec, topic: str, valid: list[Event], rejected: list[_Rejected]
    ) -> None:
        """Like `_apply`, but a failure here means the database itself cannot take writes."""
        try:
            await self._apply(spec, topic, valid, rejected)
        except Exception as exc:
            raise DatabaseUnusable(f"could not record dead letters for {spec.group}: {exc!r}") from exc

    async def _apply(
        self, spec: ConsumerSpec, topic: str, valid: list[Event], rejected: list[_Rejected]
    ) -> None:
        """One transaction: claim the marks of the events this group has not processed, hand the
        claimed ones to the handler, stage dead letters for the claimed rejects, commit. The claim is
        `INSERT ... ON CONFLICT DO NOTHING RETURNING`: a concurrent delivery of the same events either
        committed its marks first (the claim skips them; on PostgreSQL it waits for that transaction)
        or rolls back (the claim takes them), so nothing is applied twice and one statement both
        filters and marks."""
        if not valid and not rejected:
            return
        if await self._transaction(spec, topic, valid, rejected):
            self._on_outbox()

    async def _transaction(
        self, spec: ConsumerSpec, topic: str, valid: list[Event], rejected: list[_Rejected]
    ) -> bool:
        async with self._sessions() as session, session.begin():
            if spec.idempotent_writes:  # a redelivery changes nothing: no marks but the dead letters'
                claimed = await _claim(session, spec.group, [r.event_id for r in rejected])
                todo = valid
            else:
                claimed = await _claim(
                    session, spec.group, [e.id for e in valid] + [r.event_id for r in rejected]
                )
                todo = [e for e in valid if e.id in claimed]
            dead = [dead_letter_event(spec.group, topic, r) for r in rejected if r.event_id in claimed]
            if todo:
                await spec.handle(session, todo)
            if dead:
                await insert_events(session, dead)
            # Handlers may stage events of their own (a notification); the relay should look soon.
            return bool(dead) or bool(todo)


async def _claim(session: AsyncSession, group: str, event_ids: list[str]) -> set[str]:
    """Insert the marks of `event_ids` not yet processed by `group`; returns the ids newly marked."""
    if not event_ids:
        return set()
    now = utcnow()
    rows = [{"group": group, "event_id": i, "processed_at": now} for i in event_ids]
    table = ProcessedEvent.__table__
    return set(await insert_rows_skipping_duplicates(session, table, rows, returning="event_id"))


def _unique(items: list[_T], key: Callable[[_T], str]) -> list[_T]:
    """The first delivery of each id, in order (a batch may carry a redelivery of itself)."""
    seen: set[str] = set()
    out = []
    for item in items:
        if key(item) not in seen:
            seen.add(key(item))
            out.append(item)
    return out
