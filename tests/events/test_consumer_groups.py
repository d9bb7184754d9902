"""`SOMA_EVENT_CONSUMERS`: an API replica that runs no consumer groups and a worker that runs only
billing, two whole apps on one database and one NATS server (the scale-out shape), and the settings it
refuses."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import func, select

from somaagent.analytics.tables import UsageRecord
from somaagent.api.app import create_app
from somaagent.billing.tables import LedgerEntry
from somaagent.config import Settings
from somaagent.events.nats import stream_name
from somaagent.events.outbox import insert_events
from tests.events.sample_events import usage_event
from tests.support.brokers import nats_delete_stream, require_shared_nats, unique_name

pytestmark = pytest.mark.nats


SECRET = secrets.token_hex(32)  # replicas share one secret (it seals the signing keys)


def _settings(data_dir: Path, database_url: str, prefix: str, groups: str) -> Settings:
    return Settings(
        data_dir=data_dir,
        secret_key=SECRET,
        database_url=database_url,
        event_bus="nats",
        nats_url=require_shared_nats(),
        event_stream_prefix=prefix,
        event_consumers=groups,
        log_level="WARNING",
    )


async def test_an_api_replica_without_consumers_and_a_billing_worker_share_the_work(
    migrated_database: str, tmp_path: Path
) -> None:
    prefix = unique_name("t")
    api = create_app(_settings(tmp_path / "api", migrated_database, prefix, "none"))
    worker = create_app(_settings(tmp_path / "worker", migrated_database, prefix, "billing"))
    events = [usage_event(f"ten_{i % 2}") for i in range(12)]
    try:
        async with api.router.lifespan_context(api), worker.router.lifespan_context(worker):
            sessions = api.state.services.sessions
            async with sessions() as session, session.begin():
                await insert_events(session, events)
            api.state.services.relay.poke()  # the API replica publishes; only the worker consumes
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                async with sessions() as session:
                    entries = await session.scalar(select(func.count()).select_from(LedgerEntry))
                if entries == len(events):
                    break
                await asyncio.sleep(0.1)
            async with sessions() as session:
                sources = set((await session.scalars(select(LedgerEntry.source_event_id))).all())
                usage = await session.scalar(select(func.count()).select_from(UsageRecord))
    finally:
        await nats_delete_stream(require_shared_nats(), stream_name(prefix))
    assert sources == {e.id for e in events}  # billed once each, by the worker
    assert usage == 0  # the `usage` group runs in neither process: its events wait on the stream


def test_groups_need_a_broker(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="needs SOMA_EVENT_BUS=kafka or nats"):
        Settings(data_dir=tmp_path, event_consumers="billing")


@pytest.mark.parametrize("value", ["", "all,billing", "none, usage"])
def test_all_and_none_stand_alone(tmp_path: Path, value: str) -> None:
    with pytest.raises(ValidationError):
        Settings(data_dir=tmp_path, event_bus="nats", event_consumers=value)


def test_an_unknown_group_is_named_with_the_known_ones(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, event_bus="nats", event_consumers="billing,ledger")
    with pytest.raises(ValueError, match=r"names ledger; the groups are usage, audit, billing"):
        create_app(settings)
