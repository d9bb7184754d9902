"""Statements whose SQL differs between SQLite and PostgreSQL, written once."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from sqlalchemy import JSON, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

_LENGTH = re.compile(r"\(\d+\)")
_PG: Any = postgresql.dialect()  # type: ignore[no-untyped-call]


def insert_skipping_duplicates(
    session: AsyncSession, table: Any, index_elements: list[str] | None = None
) -> Any:
    """`INSERT ... ON CONFLICT DO NOTHING` for the session's backend (idempotent writes)."""
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    return dialect.insert(table).on_conflict_do_nothing(index_elements=index_elements)


_ADDING_UPSERTS: dict[tuple[str, str, tuple[str, ...], tuple[str, ...]], Any] = {}


def upsert_adding(session: AsyncSession, table: Any, key: Sequence[str], sums: Sequence[str]) -> Any:
    """`INSERT ... ON CONFLICT (key) DO UPDATE SET s = s + excluded.s` for each of `sums`: atomic
    additions to rows of totals. Built once per table and backend: building one makes column proxies,
    which cost more than a small batch of rows."""
    backend = session.get_bind().dialect.name
    cache_key = (backend, table.name, tuple(key), tuple(sums))
    statement = _ADDING_UPSERTS.get(cache_key)
    if statement is None:
        insert = (postgresql if backend == "postgresql" else sqlite).insert(table)
        statement = insert.on_conflict_do_update(
            index_elements=list(key), set_={name: table.c[name] + insert.excluded[name] for name in sums}
        )
        _ADDING_UPSERTS[cache_key] = statement
    return statement


async def insert_rows_skipping_duplicates(
    session: AsyncSession,
    table: Any,
    rows: Sequence[dict[str, Any]],
    *,
    conflict: list[str] | None = None,
    returning: str | None = None,
) -> list[Any]:
    """Insert `rows` (dicts with the same keys), skipping those that conflict (on `conflict`, or on any
    unique key); returns the `returning` column of the rows inserted (empty without `returning`).

    On PostgreSQL the rows travel as one array per column, unpacked by `unnest`: one statement and one
    set of parameters for the whole batch, where an executemany would process every row's parameters
    in Python (the larger share of a bulk insert's cost). SQLite takes the executemany. The values go
    to the driver as they are (no column type's own processing): scalar columns only, and aware
    datetimes, as everywhere here."""
    if not rows:
        return []
    if session.get_bind().dialect.name != "postgresql":
        statement = insert_skipping_duplicates(session, table, conflict)
        if returning is None:
            await session.execute(statement, list(rows))
            return []
        return list((await session.scalars(statement.returning(table.c[returning]), list(rows))).all())
    names = list(rows[0])
    defaulted = [c.name for c in table.c if c.default is not None and c.name not in rows[0]]
    if defaulted:  # `unnest` bypasses SQLAlchemy, so its Python-side defaults would not apply
        raise ValueError(f"rows for {table.name} must give {', '.join(defaulted)} (they have defaults)")
    if any(isinstance(table.c[name].type, JSON) for name in names):
        raise ValueError(f"rows for {table.name}: JSON columns need the executemany path")
    # Array casts without lengths: a cast to varchar(n) would truncate silently; the column still refuses.
    arrays = ", ".join(
        f"CAST(:c{i} AS {_LENGTH.sub('', table.c[name].type.compile(dialect=_PG))}[])"
        for i, name in enumerate(names)
    )
    target = f" ({', '.join(_quoted(table.c[n].name) for n in conflict)})" if conflict else ""
    # Every name is the table's own (looked up in `table.c` above), quoted: nothing here comes from input.
    sql = (
        f"INSERT INTO {_quoted(table.name)} ({', '.join(_quoted(n) for n in names)})"  # noqa: S608
        f" SELECT * FROM unnest({arrays}) ON CONFLICT{target} DO NOTHING"
        + (f" RETURNING {_quoted(table.c[returning].name)}" if returning else "")
    )
    params = {f"c{i}": [row[name] for row in rows] for i, name in enumerate(names)}
    result = await session.execute(text(sql), params)
    return list(result.scalars().all()) if returning else []


def _quoted(name: str) -> str:
    return str(_PG.identifier_preparer.quote(name))
