"""The delivery worker: claims due deliveries (new ones, held ones whose quiet hours ended, retries whose
backoff passed, claims whose lease expired), sends them, and records the outcome.

A claim is its own short transaction (`FOR UPDATE SKIP LOCKED` on PostgreSQL, so replicas never take the
same row) that marks the rows `sending` with a lease; the slow part, sending, holds no lock.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.core.clock import utcnow
from somaagent.core.periodic import Periodic
from somaagent.notifications.channels import DeliveryFailed, Outgoing, Sender
from somaagent.notifications.payloads import notification_json
from somaagent.notifications.tables import Delivery, Notification, Webhook

log = logging.getLogger(__name__)

DUE = ("pending", "held", "sending")  # `sending` is due again only once its lease has expired


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Attempts before the dead letter, and the first backoff (it doubles each attempt)."""

    max_attempts: int = 5
    backoff_s: float = 2.0
    max_backoff_s: float = 3600.0

    def delay(self, attempts: int) -> float:
        """The wait after the `attempts`-th failure."""
        return float(min(self.backoff_s * 2 ** (attempts - 1), self.max_backoff_s))


@dataclass(frozen=True, slots=True)
class Outcome:
    delivery_id: str
    attempts: int
    error: str | None  # None: sent
    cancelled: bool = False


class DeliveryWorker:
    """Sends due deliveries in the background; `poke()` after committing new ones."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        senders: dict[str, Sender],
        retry: RetryPolicy,
        *,
        poll_s: float = 1.0,
        batch: int = 16,
        lease_s: float = 60.0,
    ) -> None:
        self._sessions = sessions
        self._senders = senders
        self._retry = retry
        # A pass claims `batch` deliveries and sends them all at once: every claimed delivery is sent
        # within one sender timeout (seconds) of its claim, well inside the lease. (Claiming more than
        # it sends at once let the last ones start after their lease had ended, and another replica
        # sent them too.)
        self._batch = batch
        self._lease = timedelta(seconds=lease_s)
        self._periodic = Periodic("notification delivery pass", self._deliver_all_due, poll_s, log=log)

    def poke(self) -> None:
        """Ask for a pass soon (new deliveries were committed)."""
        self._periodic.poke()

    def start(self) -> None:
        """Begin delivering in the background."""
        self._periodic.start()

    async def close(self) -> None:
        """Stop delivering; a claimed delivery left unsent is taken again when its lease expires."""
        await self._periodic.close()

    async def _deliver_all_due(self) -> None:
        while await self.deliver_due() == self._batch:
            pass

    async def deliver_due(self) -> int:
        """Claim, send and record one batch of due deliveries; returns how many were claimed."""
        claimed = await self._claim(utcnow())
        if not claimed:
            return 0
        outcomes = await asyncio.gather(*(self._send(o) for o in claimed))
        await self._record(list(outcomes))
        return len(claimed)

    async def _claim(self, now: datetime) -> list[Outgoing]:
        async with self._sessions() as session, session.begin():
            query = (
                select(Delivery)
                .where(Delivery.status.in_(DUE), Delivery.next_attempt_at <= now)
                .order_by(Delivery.next_attempt_at)
                .limit(self._batch)
            )
            if session.get_bind().dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            candidates = list((await session.scalars(query)).all())
            session.expunge_all()  # the claim is written below, row by row; these copies only carry it
            rows = []
            lease_end = now + self._lease
            for row in candidates:
                # Conditional, so a claim is exclusive on SQLite too (no row locks there): a row another
                # worker took since the SELECT no longer matches, and is skipped.
                taken = await session.execute(
                    update(Delivery)
                    .where(
                        Delivery.id == row.id,
                        Delivery.status.in_(DUE),
                        Delivery.next_attempt_at <= now,
                        Delivery.attempts == row.attempts,
                    )
                    .values(
                        status="sending", attempts=row.attempts + 1, next_attempt_at=lease_end, updated_at=now
                    )
                    .execution_options(synchronize_session=False)
                )
                if taken.rowcount == 1:  # type: ignore[attr-defined]
                    row.status, row.attempts, row.next_attempt_at = "sending", row.attempts + 1, lease_end
                    rows.append(row)
            if not rows:
                return []
            notification_ids = {r.notification_id for r in rows}
            notifications = {
                n.id: n
                for n in await session.scalars(
                    select(Notification).where(Notification.id.in_(notification_ids))
                )
            }
            webhook_ids = {r.webhook_id for r in rows if r.webhook_id}
            webhooks = {
                w.id: w for w in await session.scalars(select(Webhook).where(Webhook.id.in_(webhook_ids)))
            }
            claimed = []
            for row in rows:
                notification = notifications[row.notification_id]
                claimed.append(
                    Outgoing(
                        row,
                        notification_json(notification),
                        notification.event_id,
                        webhooks.get(row.webhook_id) if row.webhook_id else None,
                    )
                )
            return claimed

    async def _send(self, outgoing: Outgoing) -> Outcome:
        delivery = outgoing.delivery
        if delivery.channel == "webhook" and outgoing.webhook is None:
            return Outcome(delivery.id, delivery.attempts, "the webhook was deleted", cancelled=True)
        sender = self._senders.get(delivery.channel)
        if sender is None:
            return Outcome(delivery.id, delivery.attempts, f"no sender for channel {delivery.channel!r}")
        try:
            await sender.send(outgoing)
        except DeliveryFailed as exc:
            return Outcome(delivery.id, delivery.attempts, str(exc) or type(exc).__name__)
        except Exception as exc:  # a sender bug fails this delivery, not the batch
            log.exception("notification sender %s failed", delivery.channel)
            return Outcome(delivery.id, delivery.attempts, f"{type(exc).__name__}: {exc}"[:1000])
        return Outcome(delivery.id, delivery.attempts, None)

    async def _record(self, outcomes: list[Outcome]) -> None:
        now = utcnow()
        async with self._sessions() as session, session.begin():
            for outcome in outcomes:
                values: dict[str, object]
                if outcome.error is None:
                    values = {"status": "sent", "sent_at": now, "last_error": None}
                elif outcome.cancelled:
                    values = {"status": "cancelled", "last_error": outcome.error}
                elif outcome.attempts >= self._retry.max_attempts:
                    values = {"status": "dead", "last_error": outcome.error}
                    log.warning(
                        "notification delivery %s dead after %d attempts",
                        outcome.delivery_id,
                        outcome.attempts,
                    )
                else:
                    retry_at = now + timedelta(seconds=self._retry.delay(outcome.attempts))
                    values = {"status": "pending", "next_attempt_at": retry_at, "last_error": outcome.error}
                # Only our own claim: if the lease expired and another worker took the row, its outcome wins.
                await session.execute(
                    update(Delivery)
                    .where(
                        Delivery.id == outcome.delivery_id,
                        Delivery.status == "sending",
                        Delivery.attempts == outcome.attempts,
                    )
                    .values(updated_at=now, **values)
                )
