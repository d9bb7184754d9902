"""The training-mode lock over HTTP on the real model: while a tenant trains, everyone but the holder gets
423 naming the holder on chat, embeddings and agent runs; the holder's calls pass and are audited; other
tenants are unaffected and cannot see or touch the lock. Both backends."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from tests.conftest import TenantCtx
from tests.support.processes import SomaServer

CHAT = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"
HELLO = {"model": CHAT, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4}


def chat(http: httpx.Client) -> httpx.Response:
    return http.post("/v1/chat/completions", json=HELLO)


def embed(http: httpx.Client) -> httpx.Response:
    return http.post("/v1/embeddings", json={"model": EMBED, "input": "hello"})


def error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()["error"]
    return body


def start(http: httpx.Client, **body: Any) -> httpx.Response:
    return http.post("/v1/training/start", json={"reason": "fine-tuning run", **body})


@pytest.fixture
def second_key(server: SomaServer, tenant: TenantCtx) -> Iterator[tuple[str, httpx.Client]]:
    """Key B of the same tenant (key A is `tenant.http`)."""
    created = tenant.http.post("/v1/keys", json={"name": "b", "role": "owner"})
    assert created.status_code == 201, created.text
    key = created.json()
    with httpx.Client(
        base_url=server.base_url, headers={"authorization": f"Bearer {key['key']}"}, timeout=120
    ) as client:
        yield str(key["id"]), client


def wait_for_audit(http: httpx.Client, timeout: float = 10, **params: Any) -> list[dict[str, Any]]:
    """Poll `GET /v1/audit` until something matches: events arrive through the outbox relay."""
    deadline = time.monotonic() + timeout
    while True:
        response = http.get("/v1/audit", params=params)
        assert response.status_code == 200, response.text
        rows: list[dict[str, Any]] = response.json()["data"]
        if rows:
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"no audit event matching {params} within {timeout}s")
        time.sleep(0.1)


def test_lock_refuses_everyone_but_the_holder_until_stopped(
    tenant: TenantCtx, second_key: tuple[str, httpx.Client], new_tenant: Callable[..., TenantCtx]
) -> None:
    key_b, b = second_key
    other = new_tenant()
    holder = f"key:{tenant.key_id}"
    assert tenant.http.get(f"/v1/training/{tenant.name}").json() == {
        "object": "training_lock",
        "tenant_id": tenant.id,
        "active": False,
        "holder": None,
        "reason": None,
        "started_at": None,
    }

    started = start(tenant.http)
    assert started.status_code == 201, started.text
    lock = started.json()
    assert lock["tenant_id"] == tenant.id
    assert lock["active"] is True
    assert (lock["holder"], lock["reason"]) == (holder, "fine-tuning run")
    datetime.fromisoformat(lock["started_at"])
    assert tenant.http.get(f"/v1/training/{tenant.id}").json() == lock
    assert b.get(f"/v1/training/{tenant.name}").json() == lock

    # Key B of the same tenant: refused with 423, told who holds the lock.
    for response in (chat(b), embed(b)):
        refused = error(response, 423)
        assert refused["code"] == "tenant_in_training"
        assert holder in refused["message"]
    session = b.post("/v1/sessions", json={})
    assert session.status_code == 201, session.text
    run = b.post(f"/v1/sessions/{session.json()['id']}/messages", json={"content": "Hi", "max_tokens": 4})
    assert holder in error(run, 423)["message"]
    # Another holder cannot take it over, nor release it.
    assert holder in error(start(b, reason="mine now"), 409)["message"]
    assert holder in error(b.post("/v1/training/stop", json={}), 409)["message"]

    # The holder's own calls pass, each audited as a training call.
    assert chat(tenant.http).status_code == 200
    assert embed(tenant.http).status_code == 200
    calls = wait_for_audit(tenant.http, type="training.call", actor=holder)
    assert calls[0]["tenant_id"] == tenant.id
    assert calls[0]["data"]["reason"] == "fine-tuning run"
    assert wait_for_audit(tenant.http, type="training.started")[0]["actor"] == holder
    by_b = b.get("/v1/audit", params={"actor": f"key:{key_b}", "type": "training.call"}).json()["data"]
    assert by_b == []  # refused calls are not training calls

    # Another tenant runs as usual and cannot see, stop or take the lock.
    assert chat(other.http).status_code == 200
    for ref in (tenant.name, tenant.id):
        assert error(other.http.get(f"/v1/training/{ref}"), 404)["param"] == "tenant"
        assert error(other.http.post("/v1/training/stop", json={"tenant": ref}), 404)["param"] == "tenant"
        assert error(start(other.http, tenant=ref), 404)["param"] == "tenant"
    assert other.http.get(f"/v1/training/{other.name}").json()["active"] is False
    assert chat(b).status_code == 423  # still locked after all that

    stopped = tenant.http.post("/v1/training/stop", json={})
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["active"] is False
    assert stopped.json()["holder"] is None
    assert chat(b).status_code == 200
    assert embed(b).status_code == 200
    assert tenant.http.get(f"/v1/training/{tenant.name}").json()["active"] is False
    assert wait_for_audit(tenant.http, type="training.stopped")[0]["data"]["holder"] == holder
    # Nothing to stop now.
    assert error(tenant.http.post("/v1/training/stop"), 404)["code"] == "training_not_active"


def test_starting_again_is_idempotent_for_the_holder(tenant: TenantCtx) -> None:
    first = start(tenant.http, reason="first")
    again = start(tenant.http, reason="second")
    try:
        assert again.status_code == 201, again.text
        assert again.json() == first.json()
    finally:
        assert tenant.http.post("/v1/training/stop", json={"tenant": tenant.name}).status_code == 200


def test_an_operator_locks_and_releases_any_tenant(admin: httpx.Client, tenant: TenantCtx) -> None:
    started = start(admin, tenant=tenant.name)
    assert started.status_code == 201, started.text
    holder = started.json()["holder"]
    assert started.json()["tenant_id"] == tenant.id
    assert holder in error(chat(tenant.http), 423)["message"]
    # The operator may also release a lock a tenant key holds.
    assert admin.post("/v1/training/stop", json={"tenant": tenant.id}).status_code == 200
    assert start(tenant.http).status_code == 201
    assert admin.post("/v1/training/stop", json={"tenant": tenant.name}).status_code == 200
    assert chat(tenant.http).status_code == 200
    assert error(admin.get("/v1/training/no-such-tenant"), 404)["param"] == "tenant"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/training/start", {}, "reason"),
        ("/v1/training/start", {"reason": ""}, "reason"),
        ("/v1/training/start", {"reason": "x" * 501}, "reason"),
        ("/v1/training/start", {"reason": 7}, "reason"),
        ("/v1/training/start", {"reason": "ok", "holder": "me"}, "holder"),
        ("/v1/training/start", {"reason": "ok", "tenant": "t" * 64}, "tenant"),
        ("/v1/training/stop", {"until": "later"}, "until"),
    ],
)
def test_bad_bodies_are_400_naming_the_field(
    tenant: TenantCtx, path: str, body: dict[str, Any], param: str
) -> None:
    refused = error(tenant.http.post(path, json=body), 400)
    assert refused["param"] == param, refused
    assert refused["type"] == "invalid_request_error"
    garbled = tenant.http.post(
        "/v1/training/start", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert error(garbled, 400)["code"] == "invalid_json"
    assert tenant.http.get(f"/v1/training/{tenant.name}").json()["active"] is False


def test_training_needs_the_training_admin_capability(tenant: TenantCtx, server: SomaServer) -> None:
    created = tenant.http.post("/v1/keys", json={"name": "chat-only", "capabilities": ["chat:use"]})
    assert created.status_code == 201, created.text
    with httpx.Client(
        base_url=server.base_url, headers={"authorization": f"Bearer {created.json()['key']}"}
    ) as chat_only:
        assert error(start(chat_only), 403)["code"] == "missing_capability"
        assert error(chat_only.get(f"/v1/training/{tenant.name}"), 403)["code"] == "missing_capability"
        assert error(chat_only.get("/v1/audit"), 403)["code"] == "missing_capability"
