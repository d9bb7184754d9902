"""`/v1/auth/mfa` over HTTP on a real `soma serve` (SQLite and PostgreSQL): enrollment, the QR image,
login with a second factor, replay refusal, recovery codes, turning MFA off, the tenant's `require_mfa`,
input validation, who may call it, and tenant isolation."""

from __future__ import annotations

import base64
import secrets
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from somaagent.identity import totp
from tests.conftest import TenantCtx
from tests.support.processes import SomaServer

PASSWORD = "correct horse battery staple"
MFA_GRANT = "urn:somaagent:grant-type:mfa-otp"


@dataclass
class UserCtx:
    tenant: TenantCtx
    username: str
    user_id: str
    http: httpx.Client  # authenticated as the user

    def login(self, otp: str | None = None) -> httpx.Response:
        form = {"grant_type": "password", "tenant": self.tenant.name, "username": self.username}
        form["password"] = PASSWORD
        if otp is not None:
            form["otp"] = otp
        return httpx.post(f"{self.http.base_url}/v1/auth/token", data=form, timeout=60)


NewUser = Callable[..., UserCtx]  # (tenant, username="alice")


def _token(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


@pytest.fixture
def new_user(server: SomaServer) -> Iterator[NewUser]:
    clients: list[httpx.Client] = []

    def make(tenant: TenantCtx, username: str = "alice") -> UserCtx:
        created = tenant.http.post("/v1/users", json={"username": username, "password": PASSWORD})
        assert created.status_code == 201, created.text
        ctx = UserCtx(
            tenant, username, created.json()["id"], httpx.Client(base_url=server.base_url, timeout=60)
        )
        ctx.http.headers["authorization"] = f"Bearer {_token(ctx.login())}"
        clients.append(ctx.http)
        return ctx

    yield make
    for client in clients:
        client.close()


def _secret(enrollment: dict[str, str]) -> bytes:
    value = enrollment["secret"]
    return base64.b32decode(value + "=" * (-len(value) % 8))


def _code(secret: bytes, ahead: int = 0) -> str:
    return totp.totp(secret, time.time() + 30 * ahead)


def _enroll(user: UserCtx) -> tuple[bytes, list[str]]:
    started = user.http.post("/v1/auth/mfa/totp/enroll")
    assert started.status_code == 200, started.text
    assert started.headers["cache-control"] == "no-store"
    secret = _secret(started.json())
    confirmed = user.http.post("/v1/auth/mfa/totp/confirm", json={"code": _code(secret)})
    assert confirmed.status_code == 200, confirmed.text
    return secret, confirmed.json()["recovery_codes"]


def _mfa_login(user: UserCtx, otp: str) -> httpx.Response:
    challenge = user.login()
    assert challenge.status_code == 401, challenge.text
    error = challenge.json()["error"]
    assert error["code"] == "mfa_required"
    return httpx.post(
        f"{user.http.base_url}/v1/auth/token",
        data={"grant_type": MFA_GRANT, "mfa_token": error["mfa_token"], "otp": otp},
        timeout=60,
    )


def _error(response: httpx.Response, status: int, code: str) -> dict[str, str]:
    assert response.status_code == status, response.text
    error: dict[str, str] = response.json()["error"]
    assert error["code"] == code, error
    assert set(error) >= {"message", "type", "param", "code"}
    return error


def test_enroll_confirm_and_log_in_with_a_second_factor(tenant: TenantCtx, new_user: NewUser) -> None:
    user = new_user(tenant)
    status = user.http.get("/v1/auth/mfa")
    assert status.status_code == 200, status.text
    assert status.json() == {
        "object": "mfa_status",
        "enabled": False,
        "pending_enrollment": False,
        "confirmed_at": None,
        "recovery_codes_left": 0,
    }
    _error(user.http.get("/v1/auth/mfa/totp/qr.png"), 404, "no_pending_enrollment")

    started = user.http.post("/v1/auth/mfa/totp/enroll")
    assert started.status_code == 200, started.text
    body = started.json()
    assert set(body) == {"secret", "otpauth_uri", "qr_png_base64"}
    uri = urlsplit(body["otpauth_uri"])
    assert (uri.scheme, uri.netloc) == ("otpauth", "totp")
    assert parse_qs(uri.query)["secret"] == [body["secret"]]
    assert base64.b64decode(body["qr_png_base64"]).startswith(b"\x89PNG\r\n\x1a\n")
    assert user.http.get("/v1/auth/mfa").json()["pending_enrollment"] is True

    qr = user.http.get("/v1/auth/mfa/totp/qr.png")
    assert qr.status_code == 200
    assert qr.headers["content-type"] == "image/png"
    assert qr.headers["cache-control"] == "no-store"
    assert qr.content[:8] == b"\x89PNG\r\n\x1a\n" and qr.content[12:16] == b"IHDR"
    width, height = struct.unpack(">II", qr.content[16:24])
    assert width == height >= 100

    # Until confirmed, MFA is not on: a password alone still logs in.
    assert user.login().status_code == 200
    secret = _secret(body)
    wrong = next(
        c for c in ("000000", "111111", "222222", "333333") if c not in {_code(secret, d) for d in (-1, 0, 1)}
    )
    _error(user.http.post("/v1/auth/mfa/totp/confirm", json={"code": wrong}), 400, "invalid_mfa_code")
    confirmed = user.http.post("/v1/auth/mfa/totp/confirm", json={"code": _code(secret)})
    assert confirmed.status_code == 200, confirmed.text
    assert confirmed.headers["cache-control"] == "no-store"
    codes = confirmed.json()["recovery_codes"]
    assert len(codes) == len(set(codes)) == 10
    status_body = user.http.get("/v1/auth/mfa").json()
    assert status_body["enabled"] is True and status_body["recovery_codes_left"] == 10
    assert status_body["confirmed_at"] is not None
    _error(user.http.post("/v1/auth/mfa/totp/enroll"), 409, "mfa_already_enabled")

    # The password alone now gets a challenge; the next step's code answers it, once.
    otp = _code(secret, ahead=1)
    assert _token(_mfa_login(user, otp))
    _error(_mfa_login(user, otp), 401, "invalid_mfa_code")
    # The code can also come with the password in one request; a recovery code works once.
    assert _token(user.login(otp=codes[0]))
    _error(user.login(otp=codes[0]), 401, "invalid_mfa_code")
    assert user.http.get("/v1/auth/mfa").json()["recovery_codes_left"] == 9


def test_recovery_codes_regenerate_and_disable(tenant: TenantCtx, new_user: NewUser) -> None:
    user = new_user(tenant)
    _, codes = _enroll(user)
    regenerated = user.http.post("/v1/auth/mfa/recovery-codes", json={"code": codes[0].upper()})
    assert regenerated.status_code == 200, regenerated.text
    assert regenerated.headers["cache-control"] == "no-store"
    new_codes = regenerated.json()["recovery_codes"]
    assert not set(new_codes) & set(codes)
    _error(_mfa_login(user, codes[1]), 401, "invalid_mfa_code")
    _error(user.http.request("DELETE", "/v1/auth/mfa/totp", json={"code": codes[2]}), 400, "invalid_mfa_code")
    assert user.http.get("/v1/auth/mfa").json()["enabled"] is True

    turned_off = user.http.request(
        "DELETE", "/v1/auth/mfa/totp", json={"code": new_codes[0].replace("-", "")}
    )
    assert turned_off.status_code == 204, turned_off.text
    assert user.http.get("/v1/auth/mfa").json() == {
        "object": "mfa_status",
        "enabled": False,
        "pending_enrollment": False,
        "confirmed_at": None,
        "recovery_codes_left": 0,
    }
    assert _token(user.login())  # the password alone again
    _error(
        user.http.request("DELETE", "/v1/auth/mfa/totp", json={"code": new_codes[1]}), 409, "mfa_not_enabled"
    )


def test_tenant_that_requires_mfa_refuses_turning_it_off(tenant: TenantCtx, new_user: NewUser) -> None:
    user = new_user(tenant)
    _, codes = _enroll(user)
    required = tenant.http.patch(f"/v1/tenants/{tenant.name}", json={"require_mfa": True})
    assert required.status_code == 200, required.text
    _error(user.http.request("DELETE", "/v1/auth/mfa/totp", json={"code": codes[0]}), 409, "mfa_required")
    # The refusal did not spend the code.
    assert _token(_mfa_login(user, codes[0]))


def test_bad_bodies_get_clear_errors(tenant: TenantCtx, new_user: NewUser) -> None:
    user = new_user(tenant)
    user.http.post("/v1/auth/mfa/totp/enroll")
    error = _error(
        user.http.post("/v1/auth/mfa/totp/confirm", json={"code": "12345"}), 400, "invalid_mfa_code"
    )
    assert error["param"] == "code"
    assert "6-digit" in error["message"]
    error = _error(
        user.http.post("/v1/auth/mfa/totp/confirm", json={"code": "123456", "remember": True}),
        400,
        "unknown_parameter",
    )
    assert error["param"] == "remember"
    _error(user.http.post("/v1/auth/mfa/totp/confirm", json={}), 400, "missing_required_parameter")
    _error(user.http.post("/v1/auth/mfa/totp/confirm", content=b"{"), 400, "invalid_json")
    error = _error(
        user.http.post("/v1/auth/mfa/recovery-codes", json={"code": "not-a-code!"}), 400, "invalid_mfa_code"
    )
    assert "recovery code" in error["message"]
    _error(user.http.post("/v1/auth/mfa/recovery-codes", json={"code": "123456"}), 409, "mfa_not_enabled")


def test_only_logged_in_users_may_call_it(
    server: SomaServer, tenant: TenantCtx, admin: httpx.Client, new_user: NewUser
) -> None:
    # API keys (tenant or operator) carry no `account:self`: MFA belongs to user accounts.
    for client in (tenant.http, admin):
        for method, path in (("GET", ""), ("POST", "/totp/enroll"), ("GET", "/totp/qr.png")):
            _error(client.request(method, f"/v1/auth/mfa{path}"), 403, "missing_capability")
    with httpx.Client(base_url=server.base_url, timeout=30) as anonymous:
        assert anonymous.get("/v1/auth/mfa").status_code == 401
    # A service account's token cannot enroll either.
    created = tenant.http.post("/v1/users", json={"username": "robot", "kind": "service"})
    assert created.status_code == 201, created.text
    granted = httpx.post(
        f"{server.base_url}/v1/auth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": created.json()["client_id"],
            "client_secret": created.json()["client_secret"],
        },
        timeout=60,
    )
    robot = {"authorization": f"Bearer {_token(granted)}"}
    enrolled = httpx.post(f"{server.base_url}/v1/auth/mfa/totp/enroll", headers=robot, timeout=60)
    assert enrolled.status_code == 403, enrolled.text


def test_tenants_are_isolated(new_tenant: Callable[..., TenantCtx], new_user: NewUser) -> None:
    name = f"alice-{secrets.token_hex(3)}"
    first = new_user(new_tenant(), name)
    second = new_user(new_tenant(), name)  # the same username in another tenant
    secret, codes = _enroll(first)
    assert second.http.get("/v1/auth/mfa").json()["enabled"] is False
    assert _token(second.login())  # still no second factor there
    # First's codes mean nothing for second.
    _error(second.http.post("/v1/auth/mfa/recovery-codes", json={"code": codes[0]}), 409, "mfa_not_enabled")
    started = second.http.post("/v1/auth/mfa/totp/enroll").json()
    assert started["secret"] != base64.b32encode(secret).decode().rstrip("=")
    _error(
        second.http.post("/v1/auth/mfa/totp/confirm", json={"code": _code(secret, 1)}),
        400,
        "invalid_mfa_code",
    )
    assert first.http.get("/v1/auth/mfa").json()["recovery_codes_left"] == 10
