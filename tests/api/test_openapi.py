"""The generated OpenAPI document describes every endpoint with its request and error schemas."""

from __future__ import annotations

import json
import re

import httpx

from tests.support.processes import SomaServer

OPEN = {"/healthz", "/readyz", "/metrics"}
# POSTs that act on the thing named by the path and take no body.
ACTIONS = ("/cancel", "/refresh")


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
            assert operation.get("security"), (method, path)  # the bearer scheme is declared
