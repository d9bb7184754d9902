"""The generated OpenAPI document describes every endpoint with its request and error schemas."""

from __future__ import annotations

import json
import re

import httpx

from somaagent.identity.capabilities import Capability
from tests.conftest import TenantCtx
from tests.support.processes import SomaServer

OPEN = {"/healthz", "/readyz", "/metrics", "/.well-known/jwks.json"}
# The only routes that need no capability: probes, metrics, the public keys, and logging in itself.
UNGUARDED = {("get", p) for p in OPEN} | {("post", "/v1/auth/token")}
# POSTs that act on the thing named by the path and take no body.
ACTIONS = ("/cancel", "/refresh", "/logout", "/enroll", "/reset-mfa", "/unlock", "/read")


def test_every_route_is_documented_with_error_schemas(server: SomaServer) -> None:
    document = httpx.get(f"{server.base_url}/openapi.json").json()
    paths = document["paths"]
    for expected in (
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/models",
        "/v1/models/{model_id}",
        "/v1/tenants",
        "/v1/keys",
        "/v1/keys/{key}",
        "/v1/model-profiles/{role}",
        "/v1/usage",
        "/v1/sessions",
        "/v1/sessions/{session_id}/messages",
        "/v1/sessions/{session_id}/events",
        "/v1/sessions/{session_id}/runs/{run_id}/cancel",
        "/v1/personas",
        "/v1/tools",
        "/v1/tools/{name}/invoke",
    ):
        assert expected in paths, expected
    schemas = document["components"]["schemas"]
    assert "ErrorResponse" in schemas
    refs = set(re.findall(r'"\$ref": ?"([^"]+)"', json.dumps(document)))
    dangling = {
        r for r in refs if not r.startswith("#/components/schemas/") or r.rsplit("/", 1)[1] not in schemas
    }
    assert not dangling, dangling
    assert "HTTPValidationError" not in schemas  # we answer 400, never 422
    for path, operations in paths.items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)
            if path in OPEN:
                continue
            errors = {code: r for code, r in responses.items() if code.startswith(("4", "5"))}
            assert "401" in errors, (method, path)
            for code, response in errors.items():
                ref = response["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorResponse"), (method, path, code)
            if method in ("post", "put", "patch") and not path.endswith(ACTIONS):
                assert "requestBody" in operation, (method, path)
            if "requestBody" in operation:
                assert "400" in errors, (method, path)
            if "{" in path:
                assert "404" in errors, (method, path)
            if (method, path) not in UNGUARDED:
                assert operation.get("security"), (method, path)  # the bearer scheme is declared


def _operations(server: SomaServer) -> list[tuple[str, str, list[str]]]:
    document = httpx.get(f"{server.base_url}/openapi.json").json()
    found = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            scopes = [
                scope
                for requirement in operation.get("security", [])
                for s in requirement.values()
                for scope in s
            ]
            found.append((method, path, scopes))
    return found


def test_every_route_names_exactly_one_capability(server: SomaServer) -> None:
    known = {c.value for c in Capability}
    for method, path, scopes in _operations(server):
        if (method, path) in UNGUARDED:
            assert scopes == [], (method, path)
            continue
        assert len(scopes) == 1 and scopes[0] in known, (method, path, scopes)


def test_no_route_answers_without_its_capability(server: SomaServer, tenant: TenantCtx) -> None:
    """Black box: every documented route refuses no credential (401) and a credential with no
    capabilities (403) before it looks at the request, so none is unguarded by accident."""
    empty = tenant.http.post("/v1/keys", json={"name": "nothing", "capabilities": []})
    assert empty.status_code == 201, empty.text
    assert empty.json()["capabilities"] == []
    bare = {"authorization": f"Bearer {empty.json()['key']}"}
    checked = 0
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        for method, path, scopes in _operations(server):
            if (method, path) in UNGUARDED:
                continue
            url = re.sub(r"\{[^}]+\}", "x", path)
            anonymous = client.request(method, url, json={})
            assert anonymous.status_code == 401, (method, path, anonymous.text)
            refused = client.request(method, url, json={}, headers=bare)
            assert refused.status_code == 403, (method, path, refused.text)
            error = refused.json()["error"]
            assert error["code"] == "missing_capability" and f"`{scopes[0]}`" in error["message"], (
                method,
                path,
            )
            checked += 1
    assert checked > 50
