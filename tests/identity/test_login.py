"""Users log in over HTTP: password and client-credentials grants, refresh rotation with reuse detection,
logout, role-derived capabilities, lockouts, and tenant isolation. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Callable
from typing import Any

import httpx

from tests.conftest import TenantCtx
from tests.support.processes import SomaServer

PASSWORD = "correct horse battery staple"


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    return error


def make_user(tenant: TenantCtx, role: str = "member", **extra: Any) -> dict[str, Any]:
    body = {"username": f"u-{secrets.token_hex(4)}@example.com", "role": role, "password": PASSWORD, **extra}
    created = tenant.http.post("/v1/users", json=body)
    assert created.status_code == 201, created.text
    user: dict[str, Any] = created.json()
    return user


def login(
    server: SomaServer, tenant: TenantCtx, username: str, password: str = PASSWORD, **extra: str
) -> httpx.Response:
    form = {
        "grant_type": "password",
        "tenant": tenant.name,
        "username": username,
        "password": password,
        **extra,
    }
    return httpx.post(f"{server.v1}/auth/token", data=form, timeout=30)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_password_login_gives_tokens_with_the_roles_capabilities(
    server: SomaServer, tenant: TenantCtx
) -> None:
    user = make_user(tenant, "member")
    assert user["role"] == "member" and user["kind"] == "human" and "password" not in user
    granted = login(server, tenant, user["username"])
    assert granted.status_code == 200, granted.text
    assert granted.headers["cache-control"] == "no-store"
    body = granted.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 900
    assert body["refresh_token"].startswith("rt-soma-")
    assert set(body["scope"].split()) == {
        "account:self",
        "chat:use",
        "memory:read",
        "memory:write",
        "tools:execute",
        "billing:read",
        "analytics:read",
        "notifications:read",
    }
    with httpx.Client(base_url=server.base_url, headers=bearer(body["access_token"]), timeout=30) as client:
        assert client.get("/v1/models").status_code == 200
        me = client.get("/v1/users/me").json()
        assert me["id"] == user["id"] and me["tenant_id"] == tenant.id
        error = error_of(client.get("/v1/users"), 403)
        assert error["code"] == "missing_capability" and "`users:admin`" in error["message"]
    # JSON bodies work as well as RFC 6749 forms.
    as_json = httpx.post(
        f"{server.v1}/auth/token",
        json={
            "grant_type": "password",
            "tenant": tenant.id,
            "username": user["username"],
            "password": PASSWORD,
        },
    )
    assert as_json.status_code == 200, as_json.text


def test_unknown_user_and_wrong_password_get_the_same_answer(server: SomaServer, tenant: TenantCtx) -> None:
    user = make_user(tenant)
    wrong = login(server, tenant, user["username"], "not the password at all")
    unknown = login(server, tenant, "nobody@example.com")
    no_tenant = httpx.post(
        f"{server.v1}/auth/token",
        data={"grant_type": "password", "tenant": "no-such-tenant", "username": "x", "password": PASSWORD},
    )
    for response in (wrong, unknown, no_tenant):
        assert response.status_code == 401
        assert response.json() == {
            "error": {
                "message": "invalid username or password",
                "type": "authentication_error",
                "param": None,
                "code": "invalid_grant",
            }
        }


def test_bad_token_requests_are_400_naming_the_parameter(server: SomaServer, tenant: TenantCtx) -> None:
    url = f"{server.v1}/auth/token"
    missing = error_of(
        httpx.post(url, data={"grant_type": "password", "tenant": tenant.name, "username": "a"}), 400
    )
    assert missing["param"] == "password" and missing["code"] == "missing_required_parameter"
    grant = error_of(httpx.post(url, data={"grant_type": "implicit"}), 400)
    assert grant["param"] == "grant_type"
    extra = error_of(httpx.post(url, json={"grant_type": "password", "admin": True}), 400)
    assert extra["param"] == "admin"
    assert error_of(httpx.post(url, content=b"{", headers={"content-type": "application/json"}), 400)[
        "code"
    ] == ("invalid_json")
    assert error_of(httpx.post(url, content=b"x", headers={"content-type": "text/plain"}), 400)["code"] == (
        "unsupported_media_type"
    )


def test_refresh_rotates_and_reuse_revokes_the_whole_login(server: SomaServer, tenant: TenantCtx) -> None:
    user = make_user(tenant)
    first = login(server, tenant, user["username"]).json()
    url = f"{server.v1}/auth/token"
    second = httpx.post(url, data={"grant_type": "refresh_token", "refresh_token": first["refresh_token"]})
    assert second.status_code == 200, second.text
    rotated = second.json()
    assert rotated["refresh_token"] != first["refresh_token"]
    assert rotated["access_token"] != first["access_token"]
    assert httpx.get(f"{server.v1}/models", headers=bearer(rotated["access_token"])).status_code == 200
    # The first refresh token again: someone has a copy. Everything of this login dies.
    reused = httpx.post(url, data={"grant_type": "refresh_token", "refresh_token": first["refresh_token"]})
    assert "already used" in error_of(reused, 401)["message"]
    again = httpx.post(url, data={"grant_type": "refresh_token", "refresh_token": rotated["refresh_token"]})
    assert error_of(again, 401)["code"] == "invalid_grant"
    revoked = error_of(httpx.get(f"{server.v1}/models", headers=bearer(rotated["access_token"])), 401)
    assert revoked["code"] == "token_revoked"
    # Another login of the same user is not affected.
    other = login(server, tenant, user["username"]).json()
    assert httpx.get(f"{server.v1}/models", headers=bearer(other["access_token"])).status_code == 200
    unknown = httpx.post(url, data={"grant_type": "refresh_token", "refresh_token": "rt-soma-" + "x" * 43})
    assert error_of(unknown, 401)["code"] == "invalid_grant"


def test_logout_revokes_the_token_and_its_refresh_family(server: SomaServer, tenant: TenantCtx) -> None:
    user = make_user(tenant)
    tokens = login(server, tenant, user["username"]).json()
    out = httpx.post(f"{server.v1}/auth/logout", headers=bearer(tokens["access_token"]))
    assert out.status_code == 200, out.text
    assert error_of(httpx.get(f"{server.v1}/models", headers=bearer(tokens["access_token"])), 401)[
        "code"
    ] == ("token_revoked")
    refresh = httpx.post(
        f"{server.v1}/auth/token",
        data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
    )
    assert error_of(refresh, 401)["code"] == "invalid_grant"


def test_admin_revokes_a_token_or_every_token_of_a_user(server: SomaServer, tenant: TenantCtx) -> None:
    user = make_user(tenant)
    one, two = (login(server, tenant, user["username"]).json() for _ in range(2))
    assert tenant.http.post("/v1/auth/revoke", json={"token": one["access_token"]}).status_code == 200
    assert httpx.get(f"{server.v1}/models", headers=bearer(one["access_token"])).status_code == 401
    assert httpx.get(f"{server.v1}/models", headers=bearer(two["access_token"])).status_code == 200
    assert tenant.http.post("/v1/auth/revoke", json={"user": user["id"]}).status_code == 200
    assert httpx.get(f"{server.v1}/models", headers=bearer(two["access_token"])).status_code == 401
    assert error_of(tenant.http.post("/v1/auth/revoke", json={"jti": "abc"}), 403)["code"] == "forbidden"
    assert error_of(tenant.http.post("/v1/auth/revoke", json={}), 400)["message"].startswith(
        "send exactly one"
    )


def test_role_change_and_disable_apply_at_once(server: SomaServer, tenant: TenantCtx) -> None:
    user = make_user(tenant, "viewer")
    tokens = login(server, tenant, user["username"]).json()
    changed = tenant.http.patch(f"/v1/users/{user['id']}", json={"role": "admin"})
    assert changed.status_code == 200 and changed.json()["role"] == "admin"
    assert httpx.get(f"{server.v1}/models", headers=bearer(tokens["access_token"])).status_code == 401
    admin_tokens = login(server, tenant, user["username"]).json()
    assert "users:admin" in admin_tokens["scope"].split()
    assert tenant.http.patch(f"/v1/users/{user['id']}", json={"disabled": True}).json()["disabled"] is True
    assert httpx.get(f"{server.v1}/models", headers=bearer(admin_tokens["access_token"])).status_code == 401
    assert error_of(login(server, tenant, user["username"]), 401)["code"] == "invalid_grant"


def test_nobody_appoints_above_their_own_role(server: SomaServer, tenant: TenantCtx) -> None:
    admin_user = make_user(tenant, "admin")
    token = login(server, tenant, admin_user["username"]).json()["access_token"]
    with httpx.Client(base_url=server.base_url, headers=bearer(token), timeout=30) as client:
        body = {"username": "boss@example.com", "role": "owner", "password": PASSWORD}
        assert error_of(client.post("/v1/users", json=body), 403)["code"] == "role_escalation"
        member = client.post("/v1/users", json={**body, "role": "member"})
        assert member.status_code == 201, member.text
        assert error_of(client.patch(f"/v1/users/{admin_user['id']}", json={"role": "owner"}), 403)
        # An admin key (capabilities) cannot be minted beyond what the admin holds.
        key = client.post(
            "/v1/keys", json={"name": "mine", "role": "admin", "capabilities": ["chat:use", "users:admin"]}
        )
        assert key.status_code == 201, key.text
        assert error_of(client.post("/v1/keys", json={"name": "x", "scope": "admin"}), 403)


def test_weak_passwords_and_bad_usernames_are_refused(tenant: TenantCtx) -> None:
    weak = error_of(tenant.http.post("/v1/users", json={"username": "a@b.c", "password": "short"}), 400)
    assert weak["param"] == "password" and weak["code"] == "weak_password"
    bad = error_of(tenant.http.post("/v1/users", json={"username": "has space", "password": PASSWORD}), 400)
    assert bad["param"] == "username"
    role = error_of(tenant.http.post("/v1/users", json={"username": "a@b.c", "role": "god"}), 400)
    assert role["param"] == "role"
    make_user(tenant, username="dup@example.com")
    dup = error_of(
        tenant.http.post("/v1/users", json={"username": "DUP@example.com", "password": PASSWORD}), 409
    )
    assert dup["param"] == "username"


def test_service_accounts_use_client_credentials(server: SomaServer, tenant: TenantCtx) -> None:
    created = tenant.http.post("/v1/users", json={"username": "ci-bot", "kind": "service", "role": "member"})
    assert created.status_code == 201, created.text
    account = created.json()
    assert account["client_id"] == account["id"] and account["client_secret"].startswith("cs-soma-")
    url = f"{server.v1}/auth/token"
    form = {"grant_type": "client_credentials", "client_id": account["client_id"]}
    granted = httpx.post(url, data={**form, "client_secret": account["client_secret"]})
    assert granted.status_code == 200, granted.text
    assert "refresh_token" not in granted.json()
    assert "account:self" not in granted.json()["scope"].split()
    assert httpx.get(f"{server.v1}/models", headers=bearer(granted.json()["access_token"])).status_code == 200
    wrong = error_of(httpx.post(url, data={**form, "client_secret": "cs-soma-wrong"}), 401)
    assert wrong["code"] == "invalid_client"
    # A service account has no password login.
    assert error_of(login(server, tenant, "ci-bot", account["client_secret"]), 401)["code"] == "invalid_grant"


def test_users_are_private_to_their_tenant(server: SomaServer, new_tenant: Callable[..., TenantCtx]) -> None:
    mine, other = new_tenant(), new_tenant()
    theirs = make_user(other)
    assert all(u["tenant_id"] == mine.id for u in mine.http.get("/v1/users").json()["data"])
    assert error_of(mine.http.get(f"/v1/users/{theirs['id']}"), 404)["param"] == "user"
    assert error_of(mine.http.patch(f"/v1/users/{theirs['id']}", json={"disabled": True}), 404)
    assert error_of(mine.http.post(f"/v1/users/{theirs['id']}/reset-mfa"), 404)
    assert error_of(mine.http.post(f"/v1/users/{theirs['id']}/unlock"), 404)
    assert error_of(mine.http.post("/v1/auth/revoke", json={"user": theirs["id"]}), 404)
    body = {"tenant": other.name, "username": "spy@example.com", "password": PASSWORD}
    assert error_of(mine.http.post("/v1/users", json=body), 404)["param"] == "tenant"
    assert error_of(mine.http.get("/v1/users", params={"tenant": other.name}), 404)
    # A token of the other tenant's user is refused here as a token to revoke.
    token = login(server, other, theirs["username"]).json()["access_token"]
    assert error_of(mine.http.post("/v1/auth/revoke", json={"token": token}), 400)["param"] == "token"
    assert httpx.get(f"{server.v1}/models", headers=bearer(token)).status_code == 200
    # The user cannot log in through the wrong tenant.
    assert error_of(login(server, mine, theirs["username"]), 401)["code"] == "invalid_grant"


def test_changing_your_password_ends_your_logins(server: SomaServer, tenant: TenantCtx) -> None:
    user = make_user(tenant)
    old = login(server, tenant, user["username"]).json()
    with httpx.Client(base_url=server.base_url, headers=bearer(old["access_token"]), timeout=30) as client:
        wrong = client.post(
            "/v1/users/me/password", json={"current_password": "nope", "new_password": PASSWORD * 2}
        )
        assert error_of(wrong, 400)["code"] == "invalid_password"
        changed = client.post(
            "/v1/users/me/password",
            json={"current_password": PASSWORD, "new_password": "a brand new passphrase"},
        )
        assert changed.status_code == 200, changed.text
    assert httpx.get(f"{server.v1}/models", headers=bearer(old["access_token"])).status_code == 401
    assert login(server, tenant, user["username"]).status_code == 401
    assert login(server, tenant, user["username"], "a brand new passphrase").status_code == 200


def test_logins_are_audited(server: SomaServer, tenant: TenantCtx) -> None:
    user = make_user(tenant)
    login(server, tenant, user["username"], "wrong wrong wrong")
    login(server, tenant, user["username"])
    deadline = time.monotonic() + 10
    types: set[str] = set()
    while time.monotonic() < deadline:
        rows = tenant.http.get("/v1/audit", params={"type": "auth."}).json()["data"]
        types = {r["type"] for r in rows if r["data"].get("user_id") == user["id"]}
        if {"auth.login_failed", "auth.login_succeeded"} <= types:
            break
        time.sleep(0.2)
    assert {"auth.login_failed", "auth.login_succeeded"} <= types
    created = tenant.http.get("/v1/audit", params={"type": "user.created"}).json()["data"]
    assert any(r["data"]["user_id"] == user["id"] for r in created)
    assert all(PASSWORD not in str(r) for r in rows + created)


def test_a_tenant_that_requires_mfa_lets_unenrolled_users_only_enroll(
    server: SomaServer, new_tenant: Callable[..., TenantCtx]
) -> None:
    from somaagent.identity import totp

    tenant = new_tenant()
    user = make_user(tenant)
    required = tenant.http.patch(f"/v1/tenants/{tenant.name}", json={"require_mfa": True})
    assert required.status_code == 200 and required.json()["require_mfa"] is True
    first = login(server, tenant, user["username"]).json()
    assert first["scope"] == "account:self"
    with httpx.Client(base_url=server.base_url, headers=bearer(first["access_token"]), timeout=30) as client:
        assert error_of(client.get("/v1/models"), 403)["code"] == "missing_capability"
        enrollment = client.post("/v1/auth/mfa/totp/enroll").json()
        secret = base64.b32decode(enrollment["secret"] + "=" * (-len(enrollment["secret"]) % 8))
        confirmed = client.post("/v1/auth/mfa/totp/confirm", json={"code": totp.totp(secret, time.time())})
        assert confirmed.status_code == 200, confirmed.text
    challenge = login(server, tenant, user["username"])
    error = error_of(challenge, 401)
    assert error["code"] == "mfa_required" and error["mfa_token"]
    # The next step's code must be fresh: the one used to confirm cannot be replayed.
    code = totp.totp(secret, time.time() + 30)
    granted = httpx.post(
        f"{server.v1}/auth/token",
        data={"grant_type": "urn:somaagent:grant-type:mfa-otp", "mfa_token": error["mfa_token"], "otp": code},
    )
    assert granted.status_code == 200, granted.text
    assert "chat:use" in granted.json()["scope"].split()
    assert httpx.get(f"{server.v1}/models", headers=bearer(granted.json()["access_token"])).status_code == 200
    # A non-admin cannot change the tenant's settings; another tenant's admin cannot either.
    member_token = granted.json()["access_token"]
    patch = httpx.patch(
        f"{server.v1}/tenants/{tenant.name}", json={"require_mfa": False}, headers=bearer(member_token)
    )
    assert error_of(patch, 403)["code"] == "missing_capability"
    outsider = new_tenant()
    assert error_of(outsider.http.patch(f"/v1/tenants/{tenant.name}", json={"require_mfa": False}), 404)
    assert error_of(tenant.http.patch(f"/v1/tenants/{tenant.name}", json={"disabled": True}), 403)


def test_keys_act_with_a_role_no_higher_than_their_creators(server: SomaServer, tenant: TenantCtx) -> None:
    default = tenant.http.post("/v1/keys", json={"name": "app"}).json()
    assert default["role"] == "member" and "users:admin" not in default["capabilities"]
    with httpx.Client(base_url=server.base_url, headers=bearer(default["key"]), timeout=30) as app:
        assert app.get("/v1/models").status_code == 200
        assert error_of(app.post("/v1/users", json={"username": "x", "password": PASSWORD}), 403)["code"] == (
            "missing_capability"
        )
    eve = make_user(tenant, "admin")
    eve_token = login(server, tenant, eve["username"]).json()["access_token"]
    with httpx.Client(base_url=server.base_url, headers=bearer(eve_token), timeout=30) as client:
        assert error_of(client.post("/v1/keys", json={"name": "k", "role": "owner"}), 403)["code"] == (
            "role_escalation"
        )
        key = client.post("/v1/keys", json={"name": "k", "role": "admin"}).json()
        assert key["role"] == "admin"
    owner = make_user(tenant, "owner")
    with httpx.Client(base_url=server.base_url, headers=bearer(key["key"]), timeout=30) as eves_key:
        body = {"username": "boss2@example.com", "role": "owner", "password": PASSWORD}
        assert error_of(eves_key.post("/v1/users", json=body), 403)["code"] == "role_escalation"
        assert error_of(eves_key.patch(f"/v1/users/{eve['id']}", json={"role": "owner"}), 403)
        assert error_of(eves_key.patch(f"/v1/users/{owner['id']}", json={"disabled": True}), 403)
        assert error_of(eves_key.post(f"/v1/users/{owner['id']}/reset-mfa"), 403)["code"] == "role_escalation"
        assert error_of(eves_key.post("/v1/auth/revoke", json={"user": owner["id"]}), 403)
        # Demoting Eve ends the keys she made.
        assert tenant.http.patch(f"/v1/users/{eve['id']}", json={"role": "member"}).status_code == 200
        assert error_of(eves_key.get("/v1/models"), 401)["code"] == "invalid_api_key"


def test_nobody_lifts_their_own_second_factor(server: SomaServer, tenant: TenantCtx) -> None:
    admin_user = make_user(tenant, "admin")
    token = login(server, tenant, admin_user["username"]).json()["access_token"]
    mine = httpx.post(f"{server.v1}/users/{admin_user['id']}/reset-mfa", headers=bearer(token))
    assert error_of(mine, 403)["message"].startswith("you cannot do this to your own account")


def test_disabling_a_tenant_stops_its_users_tokens(
    server: SomaServer, new_tenant: Callable[..., TenantCtx], admin: httpx.Client
) -> None:
    tenant = new_tenant()
    user = make_user(tenant)
    token = login(server, tenant, user["username"]).json()["access_token"]
    assert admin.patch(f"/v1/tenants/{tenant.name}", json={"disabled": True}).status_code == 200
    assert httpx.get(f"{server.v1}/models", headers=bearer(token)).status_code == 401
    assert httpx.get(f"{server.v1}/models", headers=bearer(tenant.key)).status_code == 401
    assert error_of(login(server, tenant, user["username"]), 401)["code"] == "invalid_grant"


def test_enrolling_a_second_factor_ends_other_logins(server: SomaServer, tenant: TenantCtx) -> None:
    from somaagent.identity import totp

    user = make_user(tenant)
    stolen = login(server, tenant, user["username"]).json()  # someone else has the password
    mine = login(server, tenant, user["username"]).json()
    with httpx.Client(base_url=server.base_url, headers=bearer(mine["access_token"]), timeout=30) as client:
        enrollment = client.post("/v1/auth/mfa/totp/enroll").json()
        secret = base64.b32decode(enrollment["secret"] + "=" * (-len(enrollment["secret"]) % 8))
        assert (
            client.post(
                "/v1/auth/mfa/totp/confirm", json={"code": totp.totp(secret, time.time())}
            ).status_code
            == 200
        )
        assert client.get("/v1/users/me").status_code == 200  # the login that enrolled goes on
    assert httpx.get(f"{server.v1}/models", headers=bearer(stolen["access_token"])).status_code == 401
    url = f"{server.v1}/auth/token"
    refreshed = httpx.post(
        url, data={"grant_type": "refresh_token", "refresh_token": stolen["refresh_token"]}
    )
    assert error_of(refreshed, 401)["code"] == "invalid_grant"
    kept = httpx.post(url, data={"grant_type": "refresh_token", "refresh_token": mine["refresh_token"]})
    assert kept.status_code == 200, kept.text


def test_errors_never_echo_a_secret(server: SomaServer, tenant: TenantCtx) -> None:
    secret = "s3cret-" + "x" * 300
    too_long = tenant.http.post("/v1/users", json={"username": "echo@example.com", "password": secret})
    assert error_of(too_long, 400)["param"] == "password"
    assert "s3cret" not in too_long.text
    form = {"grant_type": "client_credentials", "client_id": "usr_x", "client_secret": secret}
    refused = httpx.post(f"{server.v1}/auth/token", data=form)
    assert refused.status_code == 400 and "s3cret" not in refused.text
