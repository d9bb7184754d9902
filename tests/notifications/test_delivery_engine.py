"""Below HTTP, on real SQLite and PostgreSQL: quiet-hours arithmetic, the consumer's idempotency and
routing, and replicas' delivery workers never sending one delivery twice."""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime, time, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.core.clock import utcnow
from somaagent.events.notices import notification_event
from somaagent.identity.tables import Tenant, User
from somaagent.notifications.channels import DeliveryFailed, Outgoing
from somaagent.notifications.consumer import NotificationsConsumer
from somaagent.notifications.preferences import Preferences, save_preferences
from somaagent.notifications.quiet_hours import QuietHours, quiet_hours
from somaagent.notifications.tables import Delivery, Notification
from somaagent.notifications.worker import DeliveryWorker, RetryPolicy


def test_quiet_hours_that_cross_midnight_end_the_next_morning() -> None:
    night = quiet_hours("22:00", "07:00", "Europe/Paris")
    # 23:30 in Paris (CET, UTC+1) on 15 January: held until 07:00 Paris on the 16th = 06:00 UTC.
    assert night.release_at(datetime(2026, 1, 15, 22, 30, tzinfo=UTC)) == datetime(
        2026, 1, 16, 6, 0, tzinfo=UTC
    )
    # 03:00 Paris: until 07:00 the same day.
    assert night.release_at(datetime(2026, 1, 16, 2, 0, tzinfo=UTC)) == datetime(
        2026, 1, 16, 6, 0, tzinfo=UTC
    )
    # Noon Paris: outside.
    assert night.release_at(datetime(2026, 1, 16, 11, 0, tzinfo=UTC)) is None
    # Summer time (CEST, UTC+2): 07:00 Paris is 05:00 UTC.
    assert night.release_at(datetime(2026, 7, 1, 1, 0, tzinfo=UTC)) == datetime(2026, 7, 1, 5, 0, tzinfo=UTC)
    day = QuietHours(time(9), time(17), "America/New_York")
    assert day.release_at(datetime(2026, 3, 2, 15, 0, tzinfo=UTC)) == datetime(2026, 3, 2, 22, 0, tzinfo=UTC)
    assert day.release_at(datetime(2026, 3, 2, 23, 0, tzinfo=UTC)) is None


async def _tenant_with_users(session: AsyncSession, roles: list[str]) -> tuple[str, list[str]]:
    now = utcnow()
    tenant_id = f"ten_{secrets.token_hex(8)}"
    session.add(Tenant(id=tenant_id, name=f"e-{secrets.token_hex(4)}", created_at=now))
    await session.flush()
    ids = []
    for role in roles:
        user_id = f"usr_{secrets.token_hex(8)}"
        session.add(
            User(
                id=user_id,
                tenant_id=tenant_id,
                username=f"{user_id}@example.com",
                kind="human",
                role=role,
                secret_hash="x",
                created_at=now,
                updated_at=now,
            )
        )
        ids.append(user_id)
    await session.commit()
    return tenant_id, ids


async def test_the_consumer_is_idempotent_and_routes_by_audience_and_preferences(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with sessions() as session:
        tenant_id, (owner, member, quiet_one) = await _tenant_with_users(
            session, ["owner", "member", "viewer"]
        )
        await save_preferences(
            session,
            tenant_id,
            quiet_one,
            Preferences(
                ("websocket", "email"), "warning", None, QuietHours(time(0), time(23, 59, 59), "UTC")
            ),
        )
        await session.commit()
    pokes: list[int] = []
    consumer = NotificationsConsumer(on_committed=lambda: pokes.append(1))
    admins = notification_event(
        tenant_id, kind="budget.80", severity="warning", message="80 %", dedupe_key="b1"
    )
    again = notification_event(
        tenant_id, kind="budget.80", severity="warning", message="80 %", dedupe_key="b1"
    )
    everyone = notification_event(tenant_id, kind="x", severity="info", message="hello", audience="tenant")
    for batch in ([admins, everyone], [again], [admins]):  # a replay and a deduplicated repeat add nothing
        async with sessions() as session, session.begin():
            await consumer(session, batch)
    assert len(pokes) == 1
    async with sessions() as session:
        notes = (await session.scalars(select(Notification).where(Notification.tenant_id == tenant_id))).all()
        assert len(notes) == 2
        rows = (await session.scalars(select(Delivery).where(Delivery.tenant_id == tenant_id))).all()
    by_note: dict[str, set[tuple[str, str | None, str]]] = {}
    for row in rows:
        by_note.setdefault(row.notification_id, set()).add((row.channel, row.user_id, row.status))
    # Admins: the owner only (the member and viewer are not admins), plus the admin key sockets.
    assert by_note[admins.data["notification_id"]] == {
        ("websocket", owner, "pending"),
        ("websocket", None, "pending"),
    }
    # Everyone, but the viewer's minimum is `warning`: info does not reach them.
    assert by_note[everyone.data["notification_id"]] == {
        ("websocket", owner, "pending"),
        ("websocket", member, "pending"),
        ("websocket", None, "pending"),
    }
    # A warning to the viewer in quiet hours is held on both their channels; critical is not.
    warn = notification_event(
        tenant_id, kind="x", severity="warning", message="w", audience="user", user_id=quiet_one
    )
    crit = notification_event(
        tenant_id, kind="x", severity="critical", message="c", audience="user", user_id=quiet_one
    )
    async with sessions() as session, session.begin():
        await consumer(session, [warn, crit])
    async with sessions() as session:
        held = (
            await session.scalars(
                select(Delivery).where(Delivery.notification_id == warn.data["notification_id"])
            )
        ).all()
        urgent = (
            await session.scalars(
                select(Delivery).where(Delivery.notification_id == crit.data["notification_id"])
            )
        ).all()
    assert {(d.channel, d.status) for d in held} == {("websocket", "held"), ("email", "held")}
    assert all(d.next_attempt_at > utcnow() for d in held)
    assert {(d.channel, d.status, d.address) for d in urgent} == {
        ("websocket", "pending", None),
        ("email", "pending", f"{quiet_one}@example.com"),
    }


class CountingSender:
    """A real sender of its own kind: it records each delivery it is handed, failing the first `fails`."""

    def __init__(self, fails: int = 0) -> None:
        self.sent: list[str] = []
        self.fails = fails

    async def send(self, outgoing: Outgoing) -> None:
        await asyncio.sleep(0.01)  # let the other worker run meanwhile
        if self.fails > 0:
            self.fails -= 1
            raise DeliveryFailed("receiver said 503")
        self.sent.append(outgoing.delivery.id)


async def test_two_workers_send_each_delivery_once_and_retry_with_backoff(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with sessions() as session:
        tenant_id, _ids = await _tenant_with_users(session, ["owner"] * 20)
    consumer = NotificationsConsumer(on_committed=lambda: None)
    events = [
        notification_event(tenant_id, kind="x", severity="info", message=str(i), audience="tenant")
        for i in range(10)
    ]
    async with sessions() as session, session.begin():
        await consumer(session, events)
    sender = CountingSender()
    retry = RetryPolicy(max_attempts=3, backoff_s=0.05)
    workers = [DeliveryWorker(sessions, {"websocket": sender}, retry, batch=25) for _ in range(2)]

    async def drain(worker: DeliveryWorker) -> None:
        while await worker.deliver_due():
            pass

    await asyncio.gather(*(drain(w) for w in workers))
    assert len(sender.sent) == 10 * 21 and len(set(sender.sent)) == len(sender.sent)
    async with sessions() as session:
        statuses = set(
            (await session.scalars(select(Delivery.status).where(Delivery.tenant_id == tenant_id))).all()
        )
    assert statuses == {"sent"}

    # A failing delivery is retried after its backoff, then dead-lettered with the error kept.
    lone = notification_event(
        tenant_id, kind="x", severity="info", message="f", audience="user", user_id=_ids[0]
    )
    async with sessions() as session, session.begin():
        await consumer(session, [lone])
    failing = CountingSender(fails=5)
    worker = DeliveryWorker(sessions, {"websocket": failing}, retry)
    assert await worker.deliver_due() == 1
    assert await worker.deliver_due() == 0  # not due again before its backoff
    deadline = datetime.now(UTC) + timedelta(seconds=5)
    while datetime.now(UTC) < deadline:
        await worker.deliver_due()
        async with sessions() as session:
            row = await session.scalar(
                select(Delivery).where(Delivery.notification_id == lone.data["notification_id"])
            )
        assert row is not None
        if row.status == "dead":
            break
        await asyncio.sleep(0.02)
    assert row.status == "dead" and row.attempts == 3 and row.last_error == "receiver said 503"
    assert failing.sent == []
