"""Shared fixtures: a real `soma serve` per database backend (SQLite and PostgreSQL), tenants, clients.

Every test that takes `server` runs once per backend. Nothing is mocked: the server runs the real
local model, real embeddings, and a real database.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.db import migrate
from somaagent.db.engine import create_engine, session_factory
from tests.support.postgres import create_database, drop_database
from tests.support.processes import SomaServer, free_port, start_soma

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]

RESTRICTED_TENANT = "tenant-b"
RESTRICTED_MODEL = "smollm2-for-b"
DEAD_MODEL = "dead-upstream"


def main_server_env() -> dict[str, str]:
    dead_port = free_port()  # nothing listens there: a real connection refusal
    extra = [
        {"id": RESTRICTED_MODEL, "provider": "llamacpp", "tenants": [RESTRICTED_TENANT]},
        {
            "id": DEAD_MODEL,
            "provider": "openai",
            "base_url": f"http://127.0.0.1:{dead_port}/v1",
            "timeout_s": 3,
        },
    ]
    return {
        "SOMA_EXTRA_MODELS": json.dumps(extra),
        "SOMA_MODEL_QUEUE": "2",
        "SOMA_LAST_USED_FLUSH_S": "0.3",
        "SOMA_BUDGET_ALERT_INTERVAL_S": "0.5",  # tests/policy/test_budget_alerts.py
        "SOMA_MCP_HTTP_ALLOWLIST": json.dumps([f"127.0.0.1:{free_port()}"]),  # tests/tools/test_mcp.py
    }


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def server(backend: str) -> Iterator[SomaServer]:
    database = None
    url = None
    if backend == "postgres":
        database, url = create_database()
    soma = start_soma(url, main_server_env())
    soma.extra["backend"] = backend
    try:
        yield soma
    finally:
        soma.stop()
        if database is not None:
            drop_database(database)


@pytest.fixture(scope="session")
def admin(server: SomaServer) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=server.base_url, headers={"authorization": f"Bearer {server.admin_key}"}, timeout=120
    ) as client:
        yield client


@dataclass
class TenantCtx:
    id: str
    name: str
    key: str
    key_id: str
    http: httpx.Client
    oai: openai.OpenAI


@pytest.fixture
def new_tenant(server: SomaServer, admin: httpx.Client) -> Iterator[Callable[..., TenantCtx]]:
    clients: list[httpx.Client] = []

    def make(name: str | None = None) -> TenantCtx:
        name = name or f"t-{secrets.token_hex(4)}"
        found = admin.get(f"/v1/tenants/{name}")
        tenant = (
            found.json()
            if found.status_code == 200
            else admin.post("/v1/tenants", json={"name": name}).json()
        )
        # An owner-role key: the tests use it to manage the tenant as well as to call models.
        created = admin.post("/v1/keys", json={"tenant": name, "name": "test", "role": "owner"})
        assert created.status_code == 201, created.text
        key = created.json()
        http = httpx.Client(
            base_url=server.base_url, headers={"authorization": f"Bearer {key['key']}"}, timeout=120
        )
        clients.append(http)
        client = openai.OpenAI(base_url=server.v1, api_key=key["key"], max_retries=0, timeout=120)
        return TenantCtx(tenant["id"], tenant["name"], key["key"], key["id"], http, client)

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def tenant(new_tenant: Callable[..., TenantCtx]) -> TenantCtx:
    return new_tenant()


@pytest.fixture
async def migrated_database(backend: str) -> AsyncIterator[str]:
    """A fresh database of this backend, migrated to head, dropped afterwards (for tests below HTTP)."""
    name = None
    if backend == "postgres":
        name, url = await asyncio.to_thread(create_database)
    else:
        url = f"sqlite+aiosqlite:///{Path(tempfile.mkdtemp(prefix='soma-db-')) / 'soma.db'}"
    await asyncio.to_thread(migrate.upgrade, url)
    yield url
    if name:
        await asyncio.to_thread(drop_database, name)


@pytest.fixture
async def sessions(migrated_database: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """A session factory on `migrated_database`."""
    engine = create_engine(migrated_database)
    yield session_factory(engine)
    await engine.dispose()
