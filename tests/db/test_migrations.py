"""The one Alembic history applies, rolls back and re-applies on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import importlib
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from somaagent.db import migrate
from somaagent.db.engine import create_engine
from tests.support.postgres import create_database, drop_database

TABLES = {
    "tenants",
    "api_keys",
    "revocation_epoch",
    "outbox",
    "usage_records",
    "model_profiles",
    "memories",
    "memory_namespaces",
    "personas",
    "agent_sessions",
    "agent_messages",
    "agent_runs",
    "agent_events",
    "tool_settings",
    "mcp_servers",
    "memory_documents",
    "memory_document_chunks",
    "users",
    "recovery_codes",
    "refresh_tokens",
    "revoked_tokens",
    "signing_keys",
    "trusted_issuers",
    "login_throttle",
    "training_locks",
    "audit_log",
    "alembic_version",
}
HEAD = "0012"


@pytest.fixture
def database_url(backend: str) -> Iterator[str]:
    if backend == "postgres":
        name, url = create_database()
        yield url
        drop_database(name)
    else:
        yield f"sqlite+aiosqlite:///{Path(tempfile.mkdtemp()) / 'm.db'}"


def _tables(url: str) -> set[str]:
    async def read() -> set[str]:
        engine = create_async_engine(url)
        async with engine.connect() as conn:
            names = await conn.run_sync(lambda sync: set(inspect(sync).get_table_names()))
        await engine.dispose()
        return names

    return asyncio.run(read())


def test_upgrade_downgrade_upgrade(database_url: str) -> None:
    migrate.upgrade(database_url)
    assert _tables(database_url) >= TABLES
    assert migrate.current(database_url) == HEAD
    command.downgrade(migrate.alembic_config(database_url), "base")
    assert _tables(database_url) <= {"alembic_version"}
    migrate.upgrade(database_url)
    assert _tables(database_url) >= TABLES
    migrate.upgrade(database_url)  # idempotent
    assert migrate.current(database_url) == HEAD


def test_migrations_match_the_table_models(database_url: str) -> None:
    """Autogenerate against the migrated database finds nothing to add: tables and migrations agree."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from somaagent.db.base import Base

    migrate.upgrade(database_url)

    async def diff() -> list[object]:
        engine = create_async_engine(database_url)
        async with engine.connect() as conn:
            found = await conn.run_sync(
                lambda sync: compare_metadata(MigrationContext.configure(sync), Base.metadata)
            )
        await engine.dispose()
        return list(found)

    for domain in (
        "agents",
        "audit",
        "analytics",
        "billing",
        "events",
        "identity",
        "memory",
        "models",
        "notifications",
        "policy",
        "tools",
    ):
        importlib.import_module(f"somaagent.{domain}.tables")

    assert asyncio.run(diff()) == []


def test_migrations_leave_a_sqlite_file_in_wal_mode_so_servers_opening_it_at_once_never_lock() -> None:
    path = Path(tempfile.mkdtemp()) / "wal.db"
    url = f"sqlite+aiosqlite:///{path}"
    migrate.upgrade(url)
    with closing(sqlite3.connect(path)) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)

    async def open_at_once(replicas: int) -> list[int]:
        engines = [create_engine(url) for _ in range(replicas)]

        async def first_query(engine: AsyncEngine) -> int:
            async with engine.connect() as conn:
                return len((await conn.execute(text("SELECT id FROM tenants"))).all())

        try:
            return await asyncio.gather(*(first_query(engine) for engine in engines))
        finally:
            for engine in engines:
                await engine.dispose()

    # Before the switch moved into migrations, each connection switched the file itself, and about one
    # start in twenty of four engines at once failed with "database is locked".
    for _ in range(20):
        assert asyncio.run(open_at_once(4)) == [0, 0, 0, 0]
