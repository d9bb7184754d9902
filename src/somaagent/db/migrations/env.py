"""Alembic environment: runs migrations on the async engine for SQLite and PostgreSQL alike.

This script is the one place that gathers every domain's tables (it is not imported by `db`).
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

import somaagent.agents.tables
import somaagent.analytics.tables
import somaagent.audit.tables
import somaagent.billing.tables
import somaagent.events.tables
import somaagent.identity.tables
import somaagent.memory.tables
import somaagent.models.tables
import somaagent.notifications.tables
import somaagent.policy.tables
import somaagent.tools.tables  # noqa: F401  (registers the tables on Base.metadata)
from somaagent.db.base import Base
from somaagent.db.engine import use_wal

target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite ALTERs need batch mode
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    engine = create_async_engine(context.config.get_main_option("sqlalchemy.url") or "")
    async with engine.connect() as connection:
        await connection.run_sync(_run)
        if connection.dialect.name == "sqlite":
            await connection.run_sync(_use_wal)
    await engine.dispose()


def _use_wal(connection: Connection) -> None:
    # Here, once, before any server's connections open the file (see `use_wal`).
    cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    use_wal(cursor)
    cursor.close()


if context.is_offline_mode():
    context.configure(url=context.config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_async())
