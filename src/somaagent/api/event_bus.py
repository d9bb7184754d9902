"""Choosing the event bus adapter from settings (composition, beside the app factory)."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.config import Settings
from somaagent.events.bus import EventBus
from somaagent.events.inprocess import InProcessBus


def build_bus(settings: Settings, sessions: async_sessionmaker[AsyncSession]) -> EventBus:
    """The bus `SOMA_EVENT_BUS` names. INTERIM: in-process only until the adapters land."""
    del settings
    return InProcessBus(sessions)
