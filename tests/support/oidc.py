"""A real OpenID Connect provider for tests: npm `oidc-provider` (tests/support/oidc_idp), loopback only.

It issues client-credentials access tokens (RS256 JWTs, `aud` = the requested resource) with a `roles`
claim per client. The signing keys come from here, so a test can restart it on the same port with a
rotated key and hold the private key to sign edge-case tokens itself.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from tests.support.processes import ROOT, free_port, wait_http

IDP_DIR = ROOT / "tests" / "support" / "oidc_idp"
# The audience of tokens requested without a `resource` parameter.
DEFAULT_AUDIENCE = "https://soma.test/api"
# Each test client and the value of its `roles` claim (a list, or a plain string for one client).
CLIENT_ROLES: dict[str, Any] = {
    "acme-admin": ["soma-admins"],
    "acme-reader": ["soma-readers"],
    "acme-multi": ["soma-readers", "unmapped-group", "soma-admins"],
    "acme-string": "soma-readers",
    "nobody": [],
}
INSTALL_HINT = "install the test IdP with `make install` (or `npm ci --prefix tests/support/oidc_idp`)"


def new_signing_key(kid: str | None = None, alg: str = "RS256") -> dict[str, Any]:
    """A fresh private JWK (`use: sig`) for the IdP: RS256 (what it signs with), ES256 or EdDSA."""
    jwk: dict[str, Any]
    if alg == "ES256":
        jwk = json.loads(ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1())))
    elif alg == "EdDSA":
        jwk = json.loads(OKPAlgorithm.to_jwk(ed25519.Ed25519PrivateKey.generate()))
    else:
        jwk = json.loads(RSAAlgorithm.to_jwk(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    jwk.pop("key_ops", None)  # PyJWT says ["sign"] for a private key; the IdP would publish it as is
    jwk.update(kid=kid or f"k-{secrets.token_hex(4)}", alg=alg, use="sig")
    return jwk


def private_key(jwk: dict[str, Any]) -> Any:
    """The `cryptography` private key of a JWK made by `new_signing_key`, to sign tokens with."""
    return {"RSA": RSAAlgorithm, "EC": ECAlgorithm, "OKP": OKPAlgorithm}[jwk["kty"]].from_jwk(json.dumps(jwk))


@dataclass
class OidcProvider:
    """A running oidc-provider process on 127.0.0.1."""

    port: int
    keys: list[dict[str, Any]]
    client_secrets: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="oidc-idp-")) / "idp.log")

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self, client_id: str, resource: str | None = None) -> str:
        """A client-credentials access token of `client_id` for `resource` (default DEFAULT_AUDIENCE)."""
        token_endpoint = httpx.get(self.issuer + "/.well-known/openid-configuration").json()["token_endpoint"]
        data = {"grant_type": "client_credentials"}
        if resource is not None:
            data["resource"] = resource
        secret = self.client_secrets[client_id]
        answer = httpx.post(token_endpoint, data=data, auth=(client_id, secret), timeout=10)
        assert answer.status_code == 200, f"{answer.status_code} {answer.text}\n{self.logs()}"
        return str(answer.json()["access_token"])

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> None:
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("node is not on PATH: the test IdP needs Node.js 20+ (`make system-packages`)")
        if not (IDP_DIR / "node_modules" / "oidc-provider").is_dir():
            raise RuntimeError(f"oidc-provider is not installed in {IDP_DIR}: {INSTALL_HINT}")
        env = {
            **os.environ,
            "IDP_PORT": str(self.port),
            "IDP_JWKS": json.dumps({"keys": self.keys}),
            "IDP_CLIENTS": json.dumps(
                [
                    {"client_id": name, "client_secret": self.client_secrets[name], "roles": roles}
                    for name, roles in CLIENT_ROLES.items()
                ]
            ),
            "IDP_DEFAULT_RESOURCE": DEFAULT_AUDIENCE,
        }
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [node, str(IDP_DIR / "server.mjs")],
                cwd=IDP_DIR,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        wait_http(self.issuer + "/.well-known/openid-configuration", 30, self.proc, self.log_path)

    def restart(self, keys: list[dict[str, Any]]) -> None:
        """Stop and start again on the same port, now signing with `keys[0]` and publishing all of `keys`."""
        self.stop()
        self.keys = keys
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def start_oidc_provider(keys: list[dict[str, Any]] | None = None) -> OidcProvider:
    """Start the IdP on a free loopback port and wait until its discovery document answers."""
    provider = OidcProvider(
        port=free_port(),
        keys=keys or [new_signing_key()],
        client_secrets={name: secrets.token_urlsafe(24) for name in CLIENT_ROLES},
    )
    provider.start()
    return provider
