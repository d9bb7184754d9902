"""Security events reach the person they concern: a sign-in from an address the user never used
before, and an admin's reset of their MFA, each appear in the user's notification backlog.

The client address is what uvicorn reports: behind a proxy on 127.0.0.1 (the default
FORWARDED_ALLOW_IPS) it is the `X-Forwarded-For` the proxy sets, which is how the tests sign in from
several addresses."""

from __future__ import annotations

import time
from typing import Any

import httpx

from tests.conftest import TenantCtx
from tests.identity.test_login import PASSWORD, bearer, make_user
from tests.support.processes import SomaServer


def sign_in(server: SomaServer, tenant: TenantCtx, username: str, address: str) -> str:
    form = {"grant_type": "password", "tenant": tenant.name, "username": username, "password": PASSWORD}
    granted = httpx.post(
        f"{server.v1}/auth/token", data=form, headers={"x-forwarded-for": address}, timeout=30
    )
    assert granted.status_code == 200, granted.text
    token: str = granted.json()["access_token"]
    return token


def notices(server: SomaServer, token: str, kind: str) -> list[dict[str, Any]]:
    page = httpx.get(f"{server.v1}/notifications/backlog", headers=bearer(token), timeout=30)
    assert page.status_code == 200, page.text
    return [n for n in page.json()["data"] if n["kind"] == kind]


def wait_for_notices(server: SomaServer, token: str, kind: str, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    found = notices(server, token, kind)
    while len(found) < count and time.monotonic() < deadline:
        time.sleep(0.2)
        found = notices(server, token, kind)
    return found


def test_a_sign_in_from_a_new_address_tells_the_user(server: SomaServer, tenant: TenantCtx) -> None:
    user = make_user(tenant)
    first = sign_in(server, tenant, user["username"], "198.51.100.7")
    assert notices(server, first, "security.new_login") == []  # a first sign-in is not news
    again = sign_in(server, tenant, user["username"], "198.51.100.7")
    assert notices(server, again, "security.new_login") == []  # nor is a known address
    elsewhere = sign_in(server, tenant, user["username"], "203.0.113.9")
    [notice] = wait_for_notices(server, elsewhere, "security.new_login", 1)
    assert notice["severity"] == "warning" and notice["user_id"] == user["id"]
    assert notice["metadata"]["address"] == "203.0.113.9"
    assert "203.0.113.9" in notice["message"]
    # Only that user hears of it: the tenant's owner key sees no such notice for itself.
    owner_view = tenant.http.get("/v1/notifications/backlog")
    assert owner_view.status_code == 200, owner_view.text
    assert [n for n in owner_view.json()["data"] if n["kind"] == "security.new_login"] == []


def test_an_mfa_reset_tells_the_user(server: SomaServer, tenant: TenantCtx) -> None:
    user = make_user(tenant)
    reset = tenant.http.post(f"/v1/users/{user['id']}/reset-mfa")
    assert reset.status_code == 200, reset.text
    token = sign_in(server, tenant, user["username"], "198.51.100.20")  # the reset ended older logins
    [notice] = wait_for_notices(server, token, "security.mfa_reset", 1)
    assert notice["user_id"] == user["id"]
    assert notice["metadata"]["reset_by"] == f"key:{tenant.key_id}"
