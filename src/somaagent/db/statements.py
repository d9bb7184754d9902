"""Statements whose SQL differs between SQLite and PostgreSQL, written once."""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession


def insert_skipping_duplicates(
    session: AsyncSession, table: Any, index_elements: list[str] | None = None
) -> Any:
    """`INSERT ... ON CONFLICT DO NOTHING` for the session's backend (idempotent writes)."""
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    return dialect.insert(table).on_conflict_do_nothing(index_elements=index_elements)
