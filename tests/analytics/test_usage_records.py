"""The `usage` group records every `model.usage` event the API can emit, on SQLite and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.analytics.tables import UsageRecord
from somaagent.analytics.usage import store_usage
from somaagent.events.consumers import ConsumerSpec
from somaagent.events.schemas import DEAD_LETTER_SUFFIX, MODEL_USAGE
from somaagent.events.wire import encode_event
from tests.events.sample_events import new_runner, outbox_rows, usage_event


async def test_the_longest_request_id_and_model_name_the_api_accepts_are_recorded(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    # A client's X-Request-Id may be 64 characters, a model name 256 (a call that fails still counts).
    request_id, model = "r" * 64, "m" * 256
    event = usage_event("ten_a", model=model, request_id=request_id, status="cancelled")
    runner, _ = new_runner(sessions)
    spec = ConsumerSpec("usage", (MODEL_USAGE,), store_usage, idempotent_writes=True)
    await runner.handle_payloads(spec, MODEL_USAGE, [encode_event(event)])
    async with sessions() as session:
        row = (await session.scalars(select(UsageRecord))).one()
    assert (row.event_id, row.request_id, row.model, row.status) == (event.id, request_id, model, "cancelled")
    assert await outbox_rows(sessions, MODEL_USAGE + DEAD_LETTER_SUFFIX) == []
