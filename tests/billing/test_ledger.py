"""The ledger's guarantees below HTTP, on SQLite and PostgreSQL: one entry per event however often it is
delivered (replaying everything changes nothing), the total of a 10,000-event run equals the usage
priced independently here, the rollups agree with the raw rows, the database refuses to change an entry,
and corrections are new, audited entries."""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.exc import DBAPIError

from somaagent.billing.corrections import post_correction
from somaagent.billing.entries import bucket_start
from somaagent.billing.invoices import build_invoice, invoice_html, parse_month
from somaagent.billing.summary import summarize
from somaagent.billing.tables import BillingRollup, LedgerEntry
from somaagent.core.clock import utcnow
from somaagent.core.errors import InvalidRequest, NotFound
from somaagent.events.schemas import Event
from somaagent.events.tables import OutboxEvent
from somaagent.policy.prices import PriceBook
from tests.billing.support import (
    OPERATOR_PRINCIPAL,
    Sessions,
    billing_consumer,
    deliver,
    tool_event,
    usage_event,
)

on_session_loop = pytest.mark.asyncio(loop_scope="session")

# (prompt, completion, cached, per call) micro-USD per million tokens / per call, by version.
RATES = {
    "alpha": [(150_000, 600_000, 75_000, 0), (300_000, 1_200_000, 150_000, 10)],
    "beta": [(1_000_000, 3_000_000, 1_000_000, 0)],
    "tool:search": [(0, 0, 0, 2_000)],
}


async def ledger_state(sessions: Sessions, tenant: str) -> tuple[int, int, int, int, list[tuple[Any, ...]]]:
    """Row count, amount, prompt and completion tokens of the raw rows, and every rollup row."""
    async with sessions() as session:
        count, amount, prompt, completion = (
            await session.execute(
                select(
                    func.count(),
                    func.sum(LedgerEntry.amount_micros),
                    func.sum(LedgerEntry.prompt_tokens),
                    func.sum(LedgerEntry.completion_tokens),
                ).where(LedgerEntry.tenant_id == tenant)
            )
        ).one()
        rollups = (
            (
                await session.execute(
                    select(BillingRollup)
                    .where(BillingRollup.tenant_id == tenant)
                    .order_by(*BillingRollup.__table__.primary_key.columns)
                )
            )
            .scalars()
            .all()
        )
    return (
        int(count),
        int(amount or 0),
        int(prompt or 0),
        int(completion or 0),
        [
            (
                r.period,
                r.bucket,
                r.kind,
                r.item,
                r.key_id,
                r.subject,
                r.user_id,
                r.entries,
                r.requests,
                r.prompt_tokens,
                r.completion_tokens,
                r.cached_tokens,
                r.amount_micros,
            )
            for r in rollups
        ],
    )


def expected_amount(name: str, version: int, prompt: int, completion: int, cached: int, ok: bool) -> int:
    """The price of one event, worked out here from the rates table (ceil of the token part)."""
    p, c, k, call = RATES[name][version - 1]
    numerator = (prompt - cached) * p + cached * k + completion * c
    return (numerator + 999_999) // 1_000_000 + (call if ok else 0)


@on_session_loop
async def test_10000_events_replayed_twice_bill_exactly_the_usage(sessions: Sessions) -> None:
    book = PriceBook(sessions, 1.0)
    suffix = secrets.token_hex(3)
    names = {
        name: f"{name}-{suffix}" if not name.startswith("tool:") else f"tool:search_{suffix}"
        for name in RATES
    }
    start = utcnow() + timedelta(seconds=2)
    switch = start + timedelta(days=1)  # alpha's version 2 takes effect a day in
    async with sessions() as session:
        for name, versions in RATES.items():
            for n, (p, c, k, call) in enumerate(versions):
                await book.set_price(
                    session,
                    OPERATOR_PRINCIPAL,
                    names[name],
                    p,
                    c,
                    cached_micros_per_mtok=k,
                    call_micros=call,
                    effective_from=start if n == 0 else switch,
                )
        await session.commit()

    rng = random.Random(6)
    tenant = f"ten_{secrets.token_hex(6)}"
    events: list[Event] = []
    expected = {"amount": 0, "prompt": 0, "completion": 0, "cached": 0}
    for _ in range(10_000):
        at = start + timedelta(seconds=rng.randrange(3 * 86_400))
        if rng.random() < 0.1:
            ok = rng.random() < 0.9
            events.append(
                tool_event(tenant, f"search_{suffix}", occurred_at=at, outcome="ok" if ok else "tool_error")
            )
            expected["amount"] += expected_amount("tool:search", 1, 0, 0, 0, ok)
            continue
        name = rng.choice(["alpha", "beta"])
        prompt, completion = rng.randrange(5_000), rng.randrange(2_000)
        cached = rng.randrange(prompt + 1) if rng.random() < 0.3 else 0
        ok = rng.random() < 0.95
        version = 2 if name == "alpha" and at >= switch else 1
        events.append(
            usage_event(
                tenant,
                names[name],
                prompt,
                completion,
                cached=cached or None,
                occurred_at=at,
                key_id=rng.choice(["key_1", "key_2", None]),
                user_id=rng.choice([None, "usr_1", "usr_2"]),
                status="ok" if ok else "upstream_error",
            )
        )
        expected["amount"] += expected_amount(name, version, prompt, completion, cached, ok)
        expected["prompt"] += prompt
        expected["completion"] += completion
        expected["cached"] += cached

    consumer = billing_consumer(sessions)
    started = time.perf_counter()
    for i in range(0, len(events), 500):
        await deliver(sessions, consumer, events[i : i + 500])
    seconds = time.perf_counter() - started
    print(f"\n10,000 events ledgered in {seconds:.2f} s ({10_000 / seconds:.0f} events/s)")
    first = await ledger_state(sessions, tenant)
    count, amount, prompt, completion, rollups = first
    assert count == 10_000
    assert (amount, prompt, completion) == (expected["amount"], expected["prompt"], expected["completion"])

    # Replay everything, in other batch sizes and orders, with some duplicates inside one batch.
    shuffled = events[:]
    rng.shuffle(shuffled)
    for i in range(0, len(shuffled), 437):
        batch = shuffled[i : i + 437]
        await deliver(sessions, consumer, batch + batch[:3])
    assert await ledger_state(sessions, tenant) == first

    # The rollups agree with the raw rows, bucket by bucket.
    raw: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0] * 6)
    async with sessions() as session:
        for e in await session.scalars(select(LedgerEntry).where(LedgerEntry.tenant_id == tenant)):
            for period in ("hour", "day"):
                key = (
                    period,
                    bucket_start(period, e.occurred_at),
                    e.kind,
                    e.item,
                    e.key_id or "",
                    e.subject or "",
                    e.user_id or "",
                )
                sums = raw[key]
                for n, value in enumerate(
                    (1, e.quantity, e.prompt_tokens, e.completion_tokens, e.cached_tokens, e.amount_micros)
                ):
                    sums[n] += value
    assert sorted((k, tuple(v)) for k, v in raw.items()) == sorted((r[:7], r[7:]) for r in rollups)

    # The summary, read from the rollups, adds up to the same.
    async with sessions() as session:
        for group_by in ("model", "key", "user", "day"):
            rows = await summarize(session, tenant, group_by, None, None)
            assert sum(r.totals.amount_micros for r in rows) == expected["amount"], group_by
            assert sum(r.totals.cached_tokens for r in rows) == expected["cached"], group_by
            assert sum(r.totals.requests for r in rows) == 10_000, group_by
        by_day = await summarize(session, tenant, "day", bucket_start("day", start), None)
        hourly = await summarize(
            session, tenant, "day", bucket_start("hour", start) + timedelta(hours=1), None
        )
    assert sum(r.totals.requests for r in by_day) == 10_000
    first_hour = sum(1 for e in events if e.occurred_at < bucket_start("hour", start) + timedelta(hours=1))
    assert sum(r.totals.requests for r in hourly) == 10_000 - first_hour


@on_session_loop
async def test_concurrent_deliveries_of_the_same_events_add_them_once(sessions: Sessions) -> None:
    tenant = f"ten_{secrets.token_hex(6)}"
    at = utcnow()
    events = [usage_event(tenant, "unpriced-model", 10, 5, occurred_at=at) for _ in range(50)]
    consumer = billing_consumer(sessions)
    await asyncio.gather(*(deliver(sessions, consumer, events) for _ in range(4)))
    count, _amount, prompt, _completion, rollups = await ledger_state(sessions, tenant)
    assert (count, prompt) == (50, 500)
    assert {(r[0], r[7], r[9]) for r in rollups} == {("hour", 50, 500), ("day", 50, 500)}


@on_session_loop
async def test_the_database_refuses_to_update_or_delete_ledger_entries(sessions: Sessions) -> None:
    tenant = f"ten_{secrets.token_hex(6)}"
    await deliver(
        sessions, billing_consumer(sessions), [usage_event(tenant, "m", 1, 1, occurred_at=utcnow())]
    )
    for statement in (
        update(LedgerEntry).where(LedgerEntry.tenant_id == tenant).values(amount_micros=0),
        delete(LedgerEntry).where(LedgerEntry.tenant_id == tenant),
    ):
        with pytest.raises(DBAPIError, match="append-only"):
            async with sessions() as session, session.begin():
                await session.execute(statement)
    async with sessions() as session:
        assert await session.scalar(select(func.count()).where(LedgerEntry.tenant_id == tenant)) == 1
        postgres = session.get_bind().dialect.name == "postgresql"
    if postgres:  # row triggers never see TRUNCATE: PostgreSQL has a statement trigger too
        with pytest.raises(DBAPIError, match="append-only"):
            async with sessions() as session, session.begin():
                await session.execute(text("TRUNCATE ledger_entries"))


async def _charge_of_1000_micros(sessions: Sessions) -> tuple[str, str, LedgerEntry]:
    """A fresh tenant, a model priced $1 per million tokens, and its ledger entry for 1000 tokens."""
    book = PriceBook(sessions, 1.0)
    model = f"m-{secrets.token_hex(3)}"
    at = utcnow() + timedelta(seconds=1)
    async with sessions() as session:
        await book.set_price(session, OPERATOR_PRINCIPAL, model, 1_000_000, 1_000_000, effective_from=at)
        await session.commit()
    tenant = f"ten_{secrets.token_hex(6)}"
    charge = usage_event(tenant, model, 600, 400, occurred_at=at)
    await deliver(sessions, billing_consumer(sessions), [charge])
    async with sessions() as session:
        original = await session.scalar(select(LedgerEntry).where(LedgerEntry.source_event_id == charge.id))
    assert original is not None and original.amount_micros == 1000
    return tenant, model, original


@on_session_loop
async def test_corrections_are_new_audited_entries_that_never_credit_more_than_charged(
    sessions: Sessions,
) -> None:
    tenant, model, original = await _charge_of_1000_micros(sessions)
    other = f"ten_{secrets.token_hex(6)}"
    async with sessions() as session:
        with pytest.raises(NotFound):  # another tenant's entry does not exist for it
            await post_correction(session, "cli", other, original.id, -10, "wrong tenant")
        fixed, created = await post_correction(
            session, "cli", tenant, original.id, -400, "outage credit", "k1"
        )
        again, repeated = await post_correction(
            session, "cli", tenant, original.id, -400, "outage credit", "k1"
        )
        assert (created, repeated, again.id) == (True, False, fixed.id)
        with pytest.raises(InvalidRequest) as too_much:
            await post_correction(session, "cli", tenant, original.id, -601, "more than charged")
        assert too_much.value.param == "amount_micros"
        with pytest.raises(InvalidRequest) as of_correction:
            await post_correction(session, "cli", tenant, fixed.id, 1, "nested")
        assert of_correction.value.param == "entry_id"
        with pytest.raises(InvalidRequest) as zero:
            await post_correction(session, "cli", tenant, original.id, 0, "nothing")
        assert zero.value.param == "amount_micros"
        await session.commit()
        audited = (
            await session.scalars(
                select(OutboxEvent).where(
                    OutboxEvent.tenant_id == tenant, OutboxEvent.type == "billing.correction_created"
                )
            )
        ).all()
    assert [a.data["entry_id"] for a in audited] == [fixed.id]
    assert (fixed.kind, fixed.corrects, fixed.amount_micros, fixed.item) == (
        "correction",
        original.id,
        -400,
        model,
    )
    assert (fixed.reason, fixed.recorded_by, fixed.key_id) == ("outage credit", "cli", original.key_id)
    async with sessions() as session:
        rows = await summarize(session, tenant, "key", None, None)
        invoice = await build_invoice(session, tenant, "<b>acme</b>", f"{fixed.occurred_at:%Y-%m}", utcnow())
    assert [(r.group, r.totals.amount_micros, r.totals.requests) for r in rows] == [("key_a", 600, 1)]
    assert [(line.item, line.quantity, line.amount_micros) for line in invoice.lines] == [(model, 1, 1000)]
    assert (invoice.subtotal_micros, invoice.corrections_micros, invoice.total_micros) == (1000, -400, 600)
    assert [c.id for c in invoice.corrections] == [fixed.id]
    page = invoice_html(invoice)
    assert "&lt;b&gt;acme&lt;/b&gt;" in page and "<b>acme</b>" not in page
    assert "0.000600" in page and invoice.number in page


@on_session_loop
async def test_two_concurrent_credits_never_take_more_than_the_entry_charged(sessions: Sessions) -> None:
    tenant, _model, original = await _charge_of_1000_micros(sessions)

    async def credit(reason: str) -> str:
        async with sessions() as session:
            try:
                await post_correction(session, "cli", tenant, original.id, -700, reason)
            except InvalidRequest as refused:
                return f"refused: {refused.param}"
            await asyncio.sleep(0.3)  # hold the transaction while the other one checks
            await session.commit()
            return "credited"

    outcomes = await asyncio.gather(credit("first"), credit("second"))
    assert sorted(outcomes) == ["credited", "refused: amount_micros"]
    async with sessions() as session:
        corrected = await session.scalar(
            select(func.sum(LedgerEntry.amount_micros)).where(LedgerEntry.corrects == original.id)
        )
    assert corrected == -700


@on_session_loop
async def test_invoices_of_empty_and_future_months(sessions: Sessions) -> None:
    now = datetime(2026, 3, 15, 12, tzinfo=UTC)
    async with sessions() as session:
        empty = await build_invoice(session, "ten_nobody", "nobody", "2026-02", now)
        current = await build_invoice(session, "ten_nobody", "nobody", "2026-03", now)
        for bad in ("2026-04", "2026-13", "26-01", "2026-1", "march"):
            with pytest.raises(InvalidRequest) as refused:
                await build_invoice(session, "ten_nobody", "nobody", bad, now)
            assert refused.value.param == "month", bad
    assert (empty.lines, empty.total_micros, empty.status) == ([], 0, "closed")
    assert empty.issued_at == datetime(2026, 3, 1, tzinfo=UTC)  # a closed month's invoice is stable
    assert (current.status, current.issued_at) == ("open", now)
    assert empty.number == (await_number := empty.number) and empty.number.startswith("INV-202602-")
    assert await_number != current.number
    assert parse_month("2025-12", now) == (
        datetime(2025, 12, 1, tzinfo=UTC),
        datetime(2026, 1, 1, tzinfo=UTC),
    )
