"""Brute-force protection: failed logins lock an account (real or not) and a client address; the lockout
ends by itself or when an admin clears it. A dedicated server with low limits, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.support.postgres import create_database, drop_database
from tests.support.processes import SomaServer, start_soma

PASSWORD = "correct horse battery staple"
ACCOUNT_LIMIT = 3
ADDRESS_LIMIT = 40  # above the attempts the account tests before it make
LOCKOUT_S = 4


@pytest.fixture(scope="module")
def strict(backend: str) -> Iterator[SomaServer]:
    database, url = create_database() if backend == "postgres" else (None, None)
    soma = start_soma(
        url,
        {
            "SOMA_LOGIN_ACCOUNT_FAILURES": str(ACCOUNT_LIMIT),
            "SOMA_LOGIN_ADDRESS_FAILURES": str(ADDRESS_LIMIT),
            "SOMA_LOGIN_LOCKOUT_S": str(LOCKOUT_S),
        },
    )
    yield soma
    soma.stop()
    if database:
        drop_database(database)


@pytest.fixture
def operator(strict: SomaServer) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=strict.base_url, headers={"authorization": f"Bearer {strict.admin_key}"}
    ) as client:
        yield client


def new_user(operator: httpx.Client) -> tuple[str, dict[str, Any]]:
    tenant = operator.post("/v1/tenants", json={"name": f"lock-{secrets.token_hex(3)}"}).json()["name"]
    body = {"tenant": tenant, "username": f"u{secrets.token_hex(3)}", "password": PASSWORD}
    user = operator.post("/v1/users", json=body)
    assert user.status_code == 201, user.text
    return tenant, user.json()


def login(server: SomaServer, tenant: str, username: str, password: str) -> httpx.Response:
    form = {"grant_type": "password", "tenant": tenant, "username": username, "password": password}
    return httpx.post(f"{server.v1}/auth/token", data=form, timeout=30)


def test_an_account_locks_and_an_admin_unlocks_it(strict: SomaServer, operator: httpx.Client) -> None:
    tenant, user = new_user(operator)
    for _ in range(ACCOUNT_LIMIT):
        assert login(strict, tenant, user["username"], "wrong password!").status_code == 401
    locked = login(strict, tenant, user["username"], PASSWORD)  # even the right password waits now
    assert locked.status_code == 429, locked.text
    assert int(locked.headers["retry-after"]) >= 1
    assert "ask a tenant admin to unlock it" in locked.json()["error"]["message"]
    unlocked = operator.post(f"/v1/users/{user['id']}/unlock")
    assert unlocked.status_code == 200 and unlocked.json()["was_locked"] is True
    assert login(strict, tenant, user["username"], PASSWORD).status_code == 200


def test_a_lockout_ends_by_itself(strict: SomaServer, operator: httpx.Client) -> None:
    tenant, user = new_user(operator)
    for _ in range(ACCOUNT_LIMIT):
        login(strict, tenant, user["username"], "wrong password!")
    assert login(strict, tenant, user["username"], PASSWORD).status_code == 429
    time.sleep(LOCKOUT_S + 0.5)
    assert login(strict, tenant, user["username"], PASSWORD).status_code == 200


def test_unknown_accounts_lock_the_same_way(strict: SomaServer, operator: httpx.Client) -> None:
    tenant, user = new_user(operator)
    real = [login(strict, tenant, user["username"], "wrong password!") for _ in range(ACCOUNT_LIMIT + 1)]
    ghost = [login(strict, tenant, "nobody-here", "wrong password!") for _ in range(ACCOUNT_LIMIT + 1)]
    assert [r.status_code for r in real] == [r.status_code for r in ghost] == [401] * ACCOUNT_LIMIT + [429]
    assert (
        real[-1].json()["error"]["message"].split(";")[0]
        == ghost[-1].json()["error"]["message"].split(";")[0]
    )
    operator.post(f"/v1/users/{user['id']}/unlock")


def test_spelling_a_name_differently_does_not_buy_more_attempts(
    strict: SomaServer, operator: httpx.Client
) -> None:
    tenant, user = new_user(operator)
    name = user["username"]
    variants = [name, f" {name}", f"{name} ", name.upper()]
    statuses = [login(strict, tenant, v, "wrong password!").status_code for v in variants]
    assert statuses == [401] * ACCOUNT_LIMIT + [429]
    operator.post(f"/v1/users/{user['id']}/unlock")


def test_concurrent_guesses_cannot_outrun_the_count(strict: SomaServer, operator: httpx.Client) -> None:
    """Each attempt is counted before its password is checked, so a burst gets the limit and no more."""
    tenant, user = new_user(operator)
    with ThreadPoolExecutor(max_workers=12) as pool:
        statuses = list(
            pool.map(lambda _: login(strict, tenant, user["username"], "wrong!wrong!").status_code, range(12))
        )
    assert statuses.count(401) == ACCOUNT_LIMIT and statuses.count(429) == 12 - ACCOUNT_LIMIT
    operator.post(f"/v1/users/{user['id']}/unlock")


def test_one_address_trying_many_accounts_is_stopped(strict: SomaServer, operator: httpx.Client) -> None:
    # Spraying one password over many names never trips an account's limit, so the address's does.
    tenant, user = new_user(operator)
    statuses = [
        login(strict, tenant, f"spray-{i}", "Summer2026!Summer").status_code for i in range(ADDRESS_LIMIT + 1)
    ]
    assert statuses[-1] == 429 and set(statuses[:-1]) <= {401, 429}
    blocked = login(strict, tenant, user["username"], PASSWORD)
    assert blocked.status_code == 429 and "this address" in blocked.json()["error"]["message"]
    time.sleep(LOCKOUT_S + 0.5)  # leave the address usable for the other tests
    assert login(strict, tenant, user["username"], PASSWORD).status_code == 200


def test_wrong_codes_on_mfa_actions_lock_the_account_too(strict: SomaServer, operator: httpx.Client) -> None:
    """A stolen access token must not buy unlimited guesses at the code that mints recovery codes."""
    from somaagent.identity import totp

    tenant, user = new_user(operator)
    token = login(strict, tenant, user["username"], PASSWORD).json()["access_token"]
    with httpx.Client(base_url=strict.base_url, headers={"authorization": f"Bearer {token}"}) as me:
        secret_b32 = me.post("/v1/auth/mfa/totp/enroll").json()["secret"]
        secret = base64.b32decode(secret_b32 + "=" * (-len(secret_b32) % 8))
        assert (
            me.post("/v1/auth/mfa/totp/confirm", json={"code": totp.totp(secret, time.time())}).status_code
            == 200
        )
        wrong = "000000" if totp.totp(secret, time.time()) != "000000" else "111111"
        statuses = [
            me.post("/v1/auth/mfa/recovery-codes", json={"code": wrong}).status_code for _ in range(4)
        ]
        assert statuses == [400] * ACCOUNT_LIMIT + [429]
        right = me.post("/v1/auth/mfa/recovery-codes", json={"code": totp.totp(secret, time.time() + 30)})
        assert right.status_code == 429  # locked even for the right code, like a login
    assert operator.post(f"/v1/users/{user['id']}/unlock").json()["was_locked"] is True
