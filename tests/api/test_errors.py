"""Errors over HTTP: every failure is an OpenAI-style body with the right status, code and `param`,
nothing leaks a traceback, and bad input never breaks the server or loses what it already holds."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import TenantCtx
from tests.support.contract import validate
from tests.support.processes import SomaServer

MODEL = "smollm2-135m-instruct"
HELLO = [{"role": "user", "content": "Say hello."}]
TEN_MB = 10 * 1024 * 1024
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def api_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """The `error` object of a response that must be an OpenAI-style error with `status`."""
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    validate(body, "ErrorResponse")
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return dict(body["error"])


def chat_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": HELLO, "max_tokens": 4}
    body.update(changes)
    return body


def anonymous(server: SomaServer, headers: dict[str, str] | None = None) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, headers=headers or {}, timeout=120)


# --- 401 / 403 ----------------------------------------------------------------------------------------------


def test_missing_key_is_401_with_a_hint(server: SomaServer) -> None:
    with anonymous(server) as client:
        response = client.post("/v1/chat/completions", json=chat_body())
    error = api_error(response, 401)
    assert error["type"] == "authentication_error"
    assert error["code"] == "invalid_api_key"
    assert "Authorization: Bearer" in error["message"]
    assert response.headers["www-authenticate"] == "Bearer"


MALFORMED = {
    "basic-scheme": "Basic dXNlcjpwYXNz",
    "no-token": "Bearer",
    "not-a-soma-key": "Bearer not-a-key",
    "too-short": "Bearer sk-soma-short",
    "too-long": "Bearer sk-soma-" + "a" * 100,
    "no-scheme": "sk-soma-" + "a" * 43,
}


@pytest.mark.parametrize("header", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_authorization_header_is_401(server: SomaServer, header: str) -> None:
    with anonymous(server, {"authorization": header}) as client:
        error = api_error(client.get("/v1/models"), 401)
    assert error["code"] == "invalid_api_key"
    assert "malformed" in error["message"]


def test_unknown_key_is_401(server: SomaServer) -> None:
    with anonymous(server, {"authorization": f"Bearer sk-soma-{secrets.token_urlsafe(32)}"}) as client:
        error = api_error(client.get("/v1/models"), 401)
    assert error["code"] == "invalid_api_key"
    assert error["message"] == "invalid API key"


def test_sdk_raises_authentication_error_for_an_unknown_key(server: SomaServer) -> None:
    client = openai.OpenAI(base_url=server.v1, api_key=f"sk-soma-{secrets.token_urlsafe(32)}", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.models.list()
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"


def test_revoked_key_is_401_on_the_very_next_request(
    new_tenant: Callable[..., TenantCtx], admin: httpx.Client
) -> None:
    tenant = new_tenant()
    assert tenant.http.get("/v1/models").status_code == 200  # now cached by the authenticator
    revoked = admin.delete(f"/v1/keys/{tenant.key_id}")
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["revoked_at"] is not None
    error = api_error(tenant.http.get("/v1/models"), 401)
    assert "revoked" in error["message"]
    with pytest.raises(openai.AuthenticationError):
        tenant.oai.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)


def test_tenant_key_cannot_create_tenants(tenant: TenantCtx) -> None:
    error = api_error(tenant.http.post("/v1/tenants", json={"name": "sneaky"}), 403)
    assert error["type"] == "permission_error"
    assert error["code"] == "missing_capability"
    assert "`tenants:admin`" in error["message"]


def test_tenant_key_cannot_create_keys_elsewhere_or_admin_keys(
    new_tenant: Callable[..., TenantCtx], admin: httpx.Client
) -> None:
    mine, other = new_tenant(), new_tenant()
    elsewhere = mine.http.post("/v1/keys", json={"tenant": other.name, "name": "x"})
    assert api_error(elsewhere, 404)["param"] == "tenant"
    error = api_error(mine.http.post("/v1/keys", json={"name": "x", "scope": "admin"}), 403)
    assert "admin key" in error["message"]
    assert api_error(mine.http.delete(f"/v1/keys/{other.key_id}"), 404)["param"] == "key"
    # An owner-level key of the operator's own tenant still cannot revoke the operator's admin key.
    admin_key_id = next(k["id"] for k in admin.get("/v1/keys").json()["data"] if k["scope"] == "admin")
    home = new_tenant("default")
    assert api_error(home.http.delete(f"/v1/keys/{admin_key_id}"), 403)["code"] == "forbidden"
    assert other.http.get("/v1/models").status_code == 200  # the other tenant's key still works


def test_key_capabilities_are_a_subset_of_the_creators(tenant: TenantCtx, server: SomaServer) -> None:
    narrow = tenant.http.post("/v1/keys", json={"name": "chat-only", "capabilities": ["chat:use"]})
    assert narrow.status_code == 201, narrow.text
    assert narrow.json()["capabilities"] == ["chat:use"]
    with anonymous(server, {"authorization": f"Bearer {narrow.json()['key']}"}) as chat_only:
        assert chat_only.get("/v1/models").status_code == 200
        error = api_error(chat_only.post("/v1/memory/remember", json={"text": "x"}), 403)
        assert error["code"] == "missing_capability" and "`memory:write`" in error["message"]
        # A narrow key cannot mint a broader one (it lacks keys:admin in the first place).
        assert (
            api_error(chat_only.post("/v1/keys", json={"name": "wider"}), 403)["code"] == "missing_capability"
        )
    unknown = api_error(tenant.http.post("/v1/keys", json={"name": "x", "capabilities": ["root"]}), 400)
    assert unknown["param"] == "capabilities" and "'root'" in unknown["message"]
    operator_only = tenant.http.post("/v1/keys", json={"name": "x", "capabilities": ["tenants:admin"]})
    assert api_error(operator_only, 400)["param"] == "capabilities"


def test_tenant_key_revokes_its_own_tenants_keys(tenant: TenantCtx, server: SomaServer) -> None:
    spare = tenant.http.post("/v1/keys", json={"name": "spare"}).json()
    revoked = tenant.http.delete(f"/v1/keys/{spare['id']}")
    assert revoked.status_code == 200, revoked.text
    with anonymous(server, {"authorization": f"Bearer {spare['key']}"}) as client:
        assert api_error(client.get("/v1/models"), 401)["code"] == "invalid_api_key"
    assert tenant.http.get("/v1/models").status_code == 200  # the creator's key still works


# --- 404 / 405 ----------------------------------------------------------------------------------------------


def test_unknown_model_is_404_listing_the_available_models(tenant: TenantCtx) -> None:
    error = api_error(tenant.http.post("/v1/chat/completions", json=chat_body(model="gpt-17")), 404)
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert "'gpt-17'" in error["message"]
    assert MODEL in error["message"] and "all-minilm-l6-v2" in error["message"]
    with pytest.raises(openai.NotFoundError) as caught:
        tenant.oai.chat.completions.create(model="gpt-17", messages=HELLO, max_tokens=2)
    assert caught.value.code == "model_not_found"


@pytest.mark.parametrize("path", ["/v1/nope", "/v2/chat/completions", "/v1/chat/completions/extra"])
def test_unknown_url_is_404(tenant: TenantCtx, path: str) -> None:
    error = api_error(tenant.http.post(path, json=chat_body()), 404)
    assert error["type"] == "invalid_request_error"
    assert "Unknown request URL" in error["message"]


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/v1/chat/completions"), ("PUT", "/v1/embeddings"), ("POST", "/v1/models")]
)
def test_wrong_method_is_405(tenant: TenantCtx, method: str, path: str) -> None:
    response = tenant.http.request(method, path)
    error = api_error(response, 405)
    assert error["type"] == "invalid_request_error"
    assert "allow" in response.headers


# --- 400: the body ------------------------------------------------------------------------------------------


def test_malformed_json_is_400(tenant: TenantCtx) -> None:
    response = tenant.http.post(
        "/v1/chat/completions",
        content=b'{"model": "x", "messages": [',
        headers={"content-type": "application/json"},
    )
    error = api_error(response, 400)
    assert error["code"] == "invalid_json"
    assert error["param"] is None
    assert "valid JSON" in error["message"]


@pytest.mark.parametrize("body", [[1, 2], "hello", 42, None], ids=["list", "string", "number", "null"])
def test_non_object_body_is_400(tenant: TenantCtx, body: object) -> None:
    error = api_error(tenant.http.post("/v1/chat/completions", json=body), 400)
    assert error["code"] == "invalid_json"
    assert error["type"] == "invalid_request_error"


def test_missing_required_field_names_it(tenant: TenantCtx) -> None:
    error = api_error(tenant.http.post("/v1/chat/completions", json={"messages": HELLO}), 400)
    assert error["param"] == "model"
    assert error["code"] == "missing_required_parameter"


TOOL_CHOICE_OTHER = {
    "tools": [WEATHER_TOOL],
    "tool_choice": {"type": "function", "function": {"name": "other"}},
}
BAD_TOOL_SCHEMA = {
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]
}
BAD_FORMAT_SCHEMA = {
    "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 12}}}
}
UNSUPPORTED = "unsupported_parameter"

# (changes to a valid body, expected param, expected code or None, a fragment the message must hold)
BAD_BODIES = [
    pytest.param({"temperature": "hot"}, "temperature", None, "'hot'", id="temperature-string"),
    pytest.param(
        {"messages": [{"role": "user", "content": 5}]},
        "messages[0].content",
        None,
        "messages[0].content",
        id="content-int",
    ),
    pytest.param(
        {"temperature": 3}, "temperature", "invalid_value", "less than or equal to 2", id="temperature-3"
    ),
    pytest.param({"top_p": 2}, "top_p", "invalid_value", "less than or equal to 1", id="top_p-2"),
    pytest.param(
        {"max_tokens": 0}, "max_tokens", "invalid_value", "greater than or equal to 1", id="max_tokens-0"
    ),
    pytest.param({"messages": []}, "messages", None, "at least 1 item", id="empty-messages"),
    pytest.param(
        {"messages": [{"role": "wizard", "content": "hi"}]},
        "messages[0].role",
        None,
        "'wizard'",
        id="bad-role",
    ),
    pytest.param(
        {"messages": [*HELLO, {"role": "tool", "content": "21C"}]},
        "messages[1]",
        None,
        "tool_call_id",
        id="tool-without-tool_call_id",
    ),
    pytest.param({"n": 2}, "n", UNSUPPORTED, "'n' = 2 is not supported", id="n-2"),
    pytest.param({"logprobs": True}, "logprobs", UNSUPPORTED, "'logprobs' is not supported", id="logprobs"),
    pytest.param(
        {"functions": [{"name": "f", "parameters": {"type": "object"}}]},
        "functions",
        UNSUPPORTED,
        "use 'tools'",
        id="functions",
    ),
    pytest.param(TOOL_CHOICE_OTHER, "tool_choice", None, "'other'", id="tool_choice-not-in-tools"),
    pytest.param(
        BAD_TOOL_SCHEMA,
        "tools[0].function.parameters",
        None,
        "not a valid JSON schema",
        id="tool-invalid-schema",
    ),
    pytest.param(
        BAD_FORMAT_SCHEMA,
        "response_format.json_schema.schema",
        None,
        "not a valid JSON schema",
        id="response_format-invalid-schema",
    ),
]


@pytest.mark.parametrize(("changes", "param", "code", "fragment"), BAD_BODIES)
def test_bad_field_is_400_naming_the_param(
    tenant: TenantCtx, changes: dict[str, Any], param: str, code: str | None, fragment: str
) -> None:
    error = api_error(tenant.http.post("/v1/chat/completions", json=chat_body(**changes)), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert error["code"] == (code or error["code"]) and error["code"], error
    assert fragment in error["message"], error


def test_unknown_top_level_field_is_named(tenant: TenantCtx) -> None:
    error = api_error(tenant.http.post("/v1/chat/completions", json=chat_body(foo=1)), 400)
    assert error["message"] == "Unrecognized request argument supplied: foo"
    assert error["param"] == "foo"
    assert error["code"] == "unknown_parameter"


def test_unsupported_parameter_through_the_sdk(tenant: TenantCtx) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        tenant.oai.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, n=2)
    assert caught.value.status_code == 400
    assert caught.value.param == "n"
    assert caught.value.code == "unsupported_parameter"


# --- 413 ----------------------------------------------------------------------------------------------------


def test_ten_megabyte_body_with_content_length_is_413(tenant: TenantCtx) -> None:
    response = tenant.http.post(
        "/v1/chat/completions", content=b" " * TEN_MB, headers={"content-type": "application/json"}
    )
    error = api_error(response, 413)
    assert error["code"] == "request_too_large"
    assert "byte limit" in error["message"]


def test_ten_megabyte_chunked_body_is_413(tenant: TenantCtx) -> None:
    def body() -> Iterator[bytes]:
        yield b'{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "'
        for _ in range(TEN_MB // 65536):
            yield b"a" * 65536
        yield b'"}]}'

    response = tenant.http.post(
        "/v1/chat/completions", content=body(), headers={"content-type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    error = api_error(response, 413)
    assert error["code"] == "request_too_large"


# --- 400: context length ------------------------------------------------------------------------------------


def test_prompt_beyond_the_context_window_is_400(tenant: TenantCtx) -> None:
    huge = [{"role": "user", "content": "word " * 100_000}]
    error = api_error(tenant.http.post("/v1/chat/completions", json=chat_body(messages=huge)), 400)
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "messages"
    assert "maximum context length" in error["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        tenant.oai.chat.completions.create(model=MODEL, messages=huge, max_tokens=2, stream=True)
    assert caught.value.code == "context_length_exceeded"


def test_max_tokens_that_cannot_fit_is_400(tenant: TenantCtx) -> None:
    error = api_error(tenant.http.post("/v1/chat/completions", json=chat_body(max_tokens=100_000)), 400)
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "max_tokens"
    assert "100000 in the completion" in error["message"]


# --- afterwards ---------------------------------------------------------------------------------------------


def test_server_still_answers_after_all_that(tenant: TenantCtx, server: SomaServer) -> None:
    assert server.proc.poll() is None
    completion = tenant.oai.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4)
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens > 0


def test_bad_input_loses_nothing(new_tenant: Callable[..., TenantCtx], admin: httpx.Client) -> None:
    tenant = new_tenant()
    before_keys = admin.get("/v1/keys", params={"tenant": tenant.name}).json()["data"]
    bad: list[tuple[str, str, Any]] = [
        ("POST", "/v1/chat/completions", chat_body(messages=[])),
        ("POST", "/v1/chat/completions", chat_body(model="nope")),
        ("POST", "/v1/chat/completions", chat_body(temperature=9)),
        ("POST", "/v1/chat/completions", [1, 2, 3]),
        ("POST", "/v1/embeddings", {"model": "all-minilm-l6-v2", "input": ""}),
        ("POST", "/v1/tenants", {"name": tenant.name}),
        ("POST", "/v1/keys", {"tenant": tenant.name, "name": ""}),
        ("DELETE", "/v1/keys/key_does_not_exist", None),
        ("PUT", "/v1/model-profiles/chat", {"models": []}),
        ("PUT", "/v1/model-profiles/villain", {"models": [MODEL]}),
    ]
    for method, path, body in bad:
        response = tenant.http.request(method, path, json=body)
        assert 400 <= response.status_code < 500, (method, path, response.text)
        api_error(response, response.status_code)
    # The admin's duplicate create is refused as a conflict, not a crash.
    api_error(admin.post("/v1/tenants", json={"name": tenant.name}), 409)
    # A name shaped like another tenant's id would make `?tenant=` ambiguous.
    assert api_error(admin.post("/v1/tenants", json={"name": tenant.id}), 400)["param"] == "name"

    tenants = {t["name"] for t in admin.get("/v1/tenants").json()["data"]}
    assert tenant.name in tenants
    after_keys = admin.get("/v1/keys", params={"tenant": tenant.name}).json()["data"]
    assert [k["id"] for k in after_keys] == [k["id"] for k in before_keys] == [tenant.key_id]
    assert after_keys[0]["revoked_at"] is None
    completion = tenant.oai.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
    assert completion.choices[0].message.content
