"""The audit log: identity actions appear in `GET /v1/audit` scoped to their tenant (operators see all),
filters and paging, the consumer's idempotency and the database's refusal to change a row. Both backends."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.audit.consumer import append_audit
from somaagent.audit.tables import AuditRecord
from somaagent.events.schemas import AUDIT_EVENTS, Event
from tests.conftest import TenantCtx

FIELDS = {"id", "type", "tenant_id", "actor", "occurred_at", "data"}


def audit(http: httpx.Client, **params: Any) -> dict[str, Any]:
    response = http.get("/v1/audit", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert body["object"] == "list"
    return body


def wait_for(
    http: httpx.Client, found: Callable[[list[dict[str, Any]]], bool], timeout: float = 10, **params: Any
) -> list[dict[str, Any]]:
    """Poll the audit log until `found(rows)`: events reach it through the outbox relay, within ~1 s."""
    deadline = time.monotonic() + timeout
    while True:
        rows = audit(http, limit=500, **params)["data"]
        if found(rows):
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"audit log never matched within {timeout}s; last rows: {rows}")
        time.sleep(0.1)


def everything(http: httpx.Client, **params: Any) -> list[dict[str, Any]]:
    """Every matching row, following `next_after`."""
    rows: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        page = audit(http, limit=500, **params, **({"after": after} if after else {}))
        rows.extend(page["data"])
        if not page["has_more"]:
            return rows
        after = page["next_after"]


def error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()["error"]
    return body


def make_key(tenant: TenantCtx, name: str) -> str:
    created = tenant.http.post("/v1/keys", json={"name": name})
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def test_key_creation_and_revocation_appear_in_that_tenants_audit_only(
    new_tenant: Callable[..., TenantCtx], admin: httpx.Client
) -> None:
    started = datetime.now(UTC) - timedelta(seconds=1)
    acme, other = new_tenant(), new_tenant()
    key_id = make_key(acme, "ci")
    assert acme.http.delete(f"/v1/keys/{key_id}").status_code == 200

    def about_key(rows: list[dict[str, Any]]) -> list[str]:
        return [r["type"] for r in rows if r["data"].get("key_id") == key_id]

    rows = wait_for(acme.http, lambda rows: len(about_key(rows)) == 2, type="api_key.")
    assert about_key(rows) == ["api_key.created", "api_key.revoked"]
    created = next(r for r in rows if r["data"].get("key_id") == key_id)
    assert set(created) == FIELDS
    assert created["tenant_id"] == acme.id
    assert created["actor"] == f"key:{acme.key_id}"
    assert created["data"]["name"] == "ci"
    assert datetime.fromisoformat(created["occurred_at"]) >= started
    # The operator made the tenant and its first key: the tenant sees that too, as done to it.
    own = audit(acme.http)["data"]
    assert {"tenant.created", "api_key.created", "api_key.revoked"} <= {r["type"] for r in own}
    assert {r["tenant_id"] for r in own} == {acme.id}

    # Another tenant sees none of it, and cannot name the tenant.
    assert all(r["tenant_id"] == other.id for r in audit(other.http)["data"])
    assert not [r for r in everything(other.http) if r["data"].get("key_id") == key_id]
    for ref in (acme.name, acme.id):
        assert error(other.http.get("/v1/audit", params={"tenant": ref}), 404)["param"] == "tenant"
    # Naming one's own tenant is the same as naming none.
    assert audit(acme.http, tenant=acme.name)["data"] == own

    # The operator sees both tenants, or one.
    operator_rows = everything(admin, type="api_key.created", since=started.isoformat())
    assert {acme.id, other.id} <= {r["tenant_id"] for r in operator_rows}
    only_acme = everything(admin, tenant=acme.id)
    assert {r["tenant_id"] for r in only_acme} == {acme.id}
    assert [r["id"] for r in only_acme] == [r["id"] for r in own]
    assert error(admin.get("/v1/audit", params={"tenant": "no-such-tenant"}), 404)["param"] == "tenant"


def test_filters_by_type_actor_and_time(new_tenant: Callable[..., TenantCtx]) -> None:
    tenant = new_tenant()
    second = tenant.http.post("/v1/keys", json={"name": "second", "role": "admin"}).json()
    make_key(tenant, "third")
    rows = wait_for(tenant.http, lambda rows: len(rows) >= 4)  # tenant.created + 3 api_key.created
    assert [r["type"] for r in rows] == ["tenant.created"] + ["api_key.created"] * 3
    stamps = [(r["occurred_at"], r["id"]) for r in rows]
    assert stamps == sorted(stamps, key=lambda s: (datetime.fromisoformat(s[0]), s[1]))

    assert [r["type"] for r in audit(tenant.http, type="tenant.created")["data"]] == ["tenant.created"]
    assert len(audit(tenant.http, type="api_key.")["data"]) == 3
    assert audit(tenant.http, type="api_key")["data"] == []  # exact unless it ends with "."
    assert audit(tenant.http, type="api_")["data"] == []
    by_key = audit(tenant.http, actor=f"key:{tenant.key_id}")["data"]
    assert [r["data"]["name"] for r in by_key] == ["second", "third"]

    # A key made by the second key is attributed to it.
    with httpx.Client(
        base_url=str(tenant.http.base_url), headers={"authorization": f"Bearer {second['key']}"}
    ) as by_second:
        assert by_second.post("/v1/keys", json={"name": "x"}).status_code == 201
        found = wait_for(by_second, lambda rows: len(rows) == 1, actor=f"key:{second['id']}")
    assert found[0]["data"]["name"] == "x"

    middle = rows[2]
    at = datetime.fromisoformat(middle["occurred_at"])
    since = audit(tenant.http, since=at.isoformat())["data"]
    until = audit(tenant.http, until=at.isoformat())["data"]
    assert [r["id"] for r in since][:2] == [middle["id"], rows[3]["id"]]
    assert [r["id"] for r in until] == [r["id"] for r in rows[:2]]
    assert all(datetime.fromisoformat(r["occurred_at"]) >= at for r in since)
    # Any zone may be used: it names the same instant.
    east = at.astimezone(timezone(timedelta(hours=2))).isoformat()
    west = at.astimezone(timezone(timedelta(hours=-5, minutes=-30))).isoformat()
    zulu = at.astimezone(UTC).isoformat().replace("+00:00", "Z")
    for spelling in (east, west, zulu):
        assert audit(tenant.http, since=spelling)["data"] == since, spelling
    window = audit(tenant.http, since=at.isoformat(), until=(at + timedelta(microseconds=1)).isoformat())
    assert [r["id"] for r in window["data"]] == [middle["id"]]


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"since": "yesterday"}, "since"),
        ({"since": "2025-01-31T12:00:00"}, "since"),  # no zone: ambiguous
        ({"until": "2025-13-01T00:00:00Z"}, "until"),
        ({"since": "2025-02-01T00:00:00Z", "until": "2025-01-01T00:00:00Z"}, "until"),
        ({"limit": "0"}, "limit"),
        ({"limit": "501"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"after": "cur_%%%"}, "after"),
        ({"after": "evt_does_not_exist"}, "after"),
        ({"type": ""}, "type"),
        ({"type": "x" * 65}, "type"),
        ({"since": "0001-01-01T00:00:00+01:00"}, "since"),  # before the first representable instant
        ({"until": "9999-12-31T23:59:59-23:59"}, "until"),
        ({"after": "cur_MDAwMS0wMS0wMVQwMDowMDowMCswMTowMHxldnRfeA"}, "after"),
    ],
)
def test_bad_filters_are_400_naming_the_parameter(
    tenant: TenantCtx, params: dict[str, str], param: str
) -> None:
    body = error(tenant.http.get("/v1/audit", params=params), 400)
    assert body["param"] == param, body
    assert body["type"] == "invalid_request_error"


def test_paging_is_stable_and_complete(new_tenant: Callable[..., TenantCtx], admin: httpx.Client) -> None:
    tenant = new_tenant()
    for n in range(6):
        make_key(tenant, f"k{n}")
    full = wait_for(tenant.http, lambda rows: len(rows) == 8)  # tenant.created, the fixture's key, 6 more
    pages: list[list[dict[str, Any]]] = []
    after: str | None = None
    while True:
        page = audit(tenant.http, limit=3, **({"after": after} if after else {}))
        pages.append(page["data"])
        if not page["has_more"]:
            assert page["next_after"] is None
            break
        after = page["next_after"]
        assert isinstance(after, str)
    assert [len(p) for p in pages] == [3, 3, 2]
    assert [r["id"] for p in pages for r in p] == [r["id"] for r in full]
    # The last id works as a cursor too; another tenant's id does not.
    assert audit(tenant.http, after=full[2]["id"])["data"] == full[3:]
    other = new_tenant()
    foreign = wait_for(other.http, lambda rows: len(rows) > 0)[0]["id"]
    assert error(tenant.http.get("/v1/audit", params={"after": foreign}), 400)["param"] == "after"
    # A cursor from the operator's view pages the same rows.
    first = audit(admin, tenant=tenant.name, limit=2)
    assert first["has_more"] is True
    assert audit(tenant.http, after=first["next_after"], limit=2)["data"] == full[2:4]


def audit_event(tenant: str | None, type_: str, **data: object) -> Event:
    return Event(topic=AUDIT_EVENTS, type=type_, tenant_id=tenant, actor="key:key_test", data=dict(data))


def audit_consumer(sessions: async_sessionmaker[AsyncSession]) -> Callable[[list[Event]], Awaitable[None]]:
    """The audit handler in a transaction of its own, as one delivery applies it."""

    async def consume(events: list[Event]) -> None:
        async with sessions() as session, session.begin():
            await append_audit(session, events)

    return consume


async def test_redelivered_events_are_stored_once(sessions: async_sessionmaker[AsyncSession]) -> None:
    consumer = audit_consumer(sessions)
    events = [audit_event("ten_a", "api_key.created", key_id="k1"), audit_event(None, "tenant.created")]
    await consumer(events)
    await consumer(events)  # redelivered
    await consumer([events[0], events[0]])  # twice in one batch
    # A redelivery never rewrites what was recorded, even if its body differs.
    await consumer([replace(events[0], data={"key_id": "forged"}, type="api_key.revoked")])
    await consumer([])
    async with sessions() as session:
        assert await session.scalar(select(func.count()).select_from(AuditRecord)) == 2
        stored = await session.get(AuditRecord, events[0].id)
    assert stored is not None
    assert (stored.tenant_id, stored.type, stored.actor) == ("ten_a", "api_key.created", "key:key_test")
    assert stored.data == {"key_id": "k1"}
    assert stored.occurred_at == events[0].occurred_at


async def test_the_database_refuses_to_update_or_delete_audit_rows(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    event = audit_event("ten_a", "api_key.revoked", key_id="k1")
    await audit_consumer(sessions)([event])
    statements = [
        update(AuditRecord).where(AuditRecord.id == event.id).values(type="api_key.created"),
        delete(AuditRecord).where(AuditRecord.id == event.id),
        delete(AuditRecord),
        text("UPDATE audit_log SET actor = 'someone-else'"),
        text("DELETE FROM audit_log"),
    ]
    for statement in statements:
        with pytest.raises(DBAPIError, match="append-only"):
            async with sessions() as session, session.begin():
                await session.execute(statement)
    async with sessions() as session:
        stored = await session.get(AuditRecord, event.id)
        assert stored is not None
        assert (stored.type, stored.actor) == ("api_key.revoked", "key:key_test")


async def test_postgres_refuses_to_truncate_the_audit_log(sessions: async_sessionmaker[AsyncSession]) -> None:
    # Row triggers do not see TRUNCATE; PostgreSQL needs a statement trigger too (SQLite has no TRUNCATE,
    # and its `DELETE FROM` without WHERE still fires row triggers, as the test above shows).
    await audit_consumer(sessions)([audit_event("ten_a", "tenant.created")])
    truncated: DBAPIError | None = None
    async with sessions() as session:
        if session.get_bind().dialect.name != "postgresql":
            return
        try:
            async with session.begin():
                await session.execute(text("TRUNCATE audit_log"))
        except DBAPIError as exc:
            truncated = exc
        left = await session.scalar(select(func.count()).select_from(AuditRecord))
    assert truncated is not None and "append-only" in str(truncated), "TRUNCATE audit_log succeeded"
    assert left == 1
