"""Running a domain operation against the database from the command line (as the local operator)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.config import Settings
from somaagent.db import migrate
from somaagent.db.engine import create_engine, session_factory

T = TypeVar("T")


def run_in_session(settings: Settings, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """Migrate, open a session, run `work`, commit."""
    migrate.upgrade(settings.resolved_database_url)

    async def go() -> T:
        engine = create_engine(settings.resolved_database_url)
        try:
            async with session_factory(engine)() as session:
                result = await work(session)
                await session.commit()
                return result
        finally:
            await engine.dispose()

    return asyncio.run(go())
