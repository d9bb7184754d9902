"""`/.well-known/jwks.json` over HTTP on a real `soma serve` (SQLite and PostgreSQL): public, cacheable,
free of private key material, the same for every caller, enough for an outside verifier to check our
access tokens, and following `soma keys rotate-signing` while old tokens keep working."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable

import httpx
from jwcrypto import jwk as jwc_jwk
from jwcrypto import jwt as jwc_jwt

from tests.conftest import TenantCtx
from tests.support.processes import SomaServer

PASSWORD = "correct horse battery staple"
PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "k"}


def _login(server: SomaServer, tenant: TenantCtx, username: str) -> str:
    created = tenant.http.post("/v1/users", json={"username": username, "password": PASSWORD})
    assert created.status_code == 201, created.text
    form = {"grant_type": "password", "tenant": tenant.name, "username": username, "password": PASSWORD}
    answer = httpx.post(f"{server.base_url}/v1/auth/token", data=form, timeout=60)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["access_token"])


def _kid(token: str) -> str:
    header = token.split(".")[0]
    return str(json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["kid"])


def _me(server: SomaServer, token: str) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"}
    return httpx.get(f"{server.base_url}/v1/users/me", headers=headers, timeout=60)


def test_jwks_is_public_cacheable_and_verifies_our_tokens(server: SomaServer, tenant: TenantCtx) -> None:
    token = _login(server, tenant, "alice")
    answer = httpx.get(f"{server.base_url}/.well-known/jwks.json", timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["cache-control"] == "public, max-age=60"
    assert answer.headers["content-type"].startswith("application/json")
    document = answer.json()
    assert set(document) == {"keys"} and document["keys"]
    for key in document["keys"]:
        assert not PRIVATE_MEMBERS & key.keys(), key
        assert key["use"] == "sig" and key["alg"] in {"EdDSA", "RS256"}
        assert key["kid"] == jwc_jwk.JWK(**key).thumbprint()  # RFC 7638
    assert _kid(token) in {key["kid"] for key in document["keys"]}

    # An outside resource server needs nothing but this document to check our tokens.
    checked = jwc_jwt.JWT(jwt=token, key=jwc_jwk.JWKSet.from_json(answer.text))
    claims = json.loads(checked.claims)
    assert claims["iss"] == "somaagent"
    assert claims["tenant_id"] == tenant.id and claims["tenant"] == tenant.name
    assert json.loads(checked.header)["typ"] == "at+jwt"

    # No credential is needed, and a junk one does not get in the way.
    junk = httpx.get(
        f"{server.base_url}/.well-known/jwks.json", headers={"authorization": "Bearer junk"}, timeout=30
    )
    assert junk.status_code == 200 and junk.json() == document


def test_jwks_is_the_same_for_every_tenant(server: SomaServer, new_tenant: Callable[..., TenantCtx]) -> None:
    first, second = new_tenant(), new_tenant()
    tokens = [_login(server, first, "alice"), _login(server, second, "bob")]
    seen = [tenant.http.get("/.well-known/jwks.json").json() for tenant in (first, second)]
    assert seen[0] == seen[1]
    assert all(_kid(token) in {key["kid"] for key in seen[0]["keys"]} for token in tokens)
    # The keys are shared, the tenant is a signed claim: each token acts only for its own tenant.
    me = _me(server, tokens[0])
    assert me.status_code == 200, me.text
    assert me.json()["tenant_id"] == first.id
    assert second.http.get(f"/v1/users/{me.json()['id']}").status_code == 404


def test_forged_tokens_get_a_clear_401(server: SomaServer, tenant: TenantCtx) -> None:
    token = _login(server, tenant, "carol")
    head, body, _ = token.split(".")
    none_header = base64.urlsafe_b64encode(json.dumps({"alg": "none", "typ": "at+jwt"}).encode()).rstrip(b"=")
    forged = {
        "alg none": f"{none_header.decode()}.{body}.",
        "signature of another token": f"{head}.{body}.{'A' * 86}",
    }
    for what, value in forged.items():
        answer = _me(server, value)
        assert answer.status_code == 401, (what, answer.text)
        error = answer.json()["error"]
        assert error["code"] == "invalid_token", (what, error)
        assert error["message"].startswith("invalid access token: "), (what, error)
    assert _me(server, token).status_code == 200


def test_rotate_signing_from_the_cli_is_followed_by_the_server(server: SomaServer, tenant: TenantCtx) -> None:
    old_token = _login(server, tenant, "dave")
    old_kid = _kid(old_token)
    done = server.soma("keys", "rotate-signing")
    assert done.returncode == 0, done.stderr
    new_kid = done.stdout.split()[3]
    assert new_kid != old_kid
    assert f"retired {old_kid}: it still verifies the tokens it signed until" in done.stdout

    deadline = time.monotonic() + 5
    while True:
        kids = [key["kid"] for key in httpx.get(f"{server.base_url}/.well-known/jwks.json").json()["keys"]]
        if kids[:1] == [new_kid]:
            break
        assert time.monotonic() < deadline, f"the server still publishes {kids} 5 s after the rotation"
        time.sleep(0.1)
    assert old_kid in kids  # retired, but its tokens have not expired: still published
    assert _me(server, old_token).status_code == 200  # and they still work

    deadline = time.monotonic() + 5
    while True:  # the server signs new tokens with the new key once it has polled
        form = {"grant_type": "password", "tenant": tenant.name, "username": "dave", "password": PASSWORD}
        fresh = httpx.post(f"{server.base_url}/v1/auth/token", data=form, timeout=60).json()["access_token"]
        if _kid(fresh) == new_kid:
            break
        assert time.monotonic() < deadline, "the server still signs with the retired key"
        time.sleep(0.2)
    assert _me(server, fresh).status_code == 200


def test_a_rotation_is_audited_for_the_operator(server: SomaServer, tenant: TenantCtx) -> None:
    done = server.soma("keys", "rotate-signing")
    assert done.returncode == 0, done.stderr
    new_kid = done.stdout.split()[3]
    operator = {"authorization": f"Bearer {server.admin_key}"}
    deadline = time.monotonic() + 10
    rows: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        rows = httpx.get(
            f"{server.v1}/audit", params={"type": "signing_key.rotated"}, headers=operator
        ).json()["data"]
        if any(r["data"]["kid"] == new_kid for r in rows):  # type: ignore[index]
            break
        time.sleep(0.2)
    found = [r for r in rows if r["data"]["kid"] == new_kid]  # type: ignore[index]
    assert found and found[0]["actor"] == "cli" and found[0]["tenant_id"] is None
    # A tenant does not see operator-wide events.
    assert tenant.http.get("/v1/audit", params={"type": "signing_key.rotated"}).json()["data"] == []
