"""Tenant isolation over HTTP: a tenant's key sees its own usage, keys, tenant, profiles and the models
it may use, and nothing of another tenant's; to the outsider, the other tenant's things do not exist."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import RESTRICTED_MODEL, RESTRICTED_TENANT, TenantCtx
from tests.support.contract import validate

MODEL = "smollm2-135m-instruct"
HELLO = [{"role": "user", "content": "Say hello."}]


def not_found(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 404, response.text
    body = response.json()
    validate(body, "ErrorResponse")
    return dict(body["error"])


def chat(tenant: TenantCtx, model: str = MODEL) -> openai.types.chat.ChatCompletion:
    return tenant.oai.chat.completions.create(model=model, messages=HELLO, max_tokens=3)


def test_usage_is_private(new_tenant: Callable[..., TenantCtx]) -> None:
    a, b = new_tenant(), new_tenant()
    chat(b)
    own = a.http.get("/v1/usage")
    assert own.status_code == 200, own.text
    assert own.json()["tenant_id"] == a.id
    assert own.json()["data"] == []  # B's call is not A's
    error = not_found(a.http.get("/v1/usage", params={"tenant": b.name}))
    assert error["param"] == "tenant"
    not_found(a.http.get("/v1/usage", params={"tenant": b.id}))
    b_usage = b.http.get("/v1/usage").json()
    assert b_usage["tenant_id"] == b.id
    assert sum(row["requests"] for row in b_usage["data"]) == 1


def test_admin_reads_any_tenants_usage(new_tenant: Callable[..., TenantCtx], admin: httpx.Client) -> None:
    b = new_tenant()
    completion = chat(b)
    assert completion.usage is not None
    for ref in (b.name, b.id):
        response = admin.get("/v1/usage", params={"tenant": ref})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["tenant_id"] == b.id
        assert [(row["model"], row["requests"]) for row in body["data"]] == [(MODEL, 1)]
        assert body["data"][0]["prompt_tokens"] == completion.usage.prompt_tokens
    assert admin.get("/v1/usage").json()["tenant_id"] != b.id  # without ?tenant=, the admin's own
    not_found(admin.get("/v1/usage", params={"tenant": "no-such-tenant"}))


def test_keys_are_private(new_tenant: Callable[..., TenantCtx], admin: httpx.Client) -> None:
    a, b = new_tenant(), new_tenant()
    listed = a.http.get("/v1/keys")
    assert listed.status_code == 200, listed.text
    keys = listed.json()["data"]
    assert [k["id"] for k in keys] == [a.key_id]
    assert all(k["tenant_id"] == a.id for k in keys)
    assert "key" not in keys[0]  # the secret is shown once, at creation
    assert not any(b.key[:12] in str(k) for k in keys)
    not_found(a.http.get("/v1/keys", params={"tenant": b.name}))
    not_found(a.http.get("/v1/keys", params={"tenant": b.id}))
    # last_used_at may move between the two reads (it is flushed every SOMA_LAST_USED_FLUSH_S).
    same = a.http.get("/v1/keys", params={"tenant": a.name}).json()["data"]
    assert [{**k, "last_used_at": None} for k in same] == [{**k, "last_used_at": None} for k in keys]
    everything = {k["id"] for k in admin.get("/v1/keys").json()["data"]}
    assert {a.key_id, b.key_id} <= everything


def test_tenants_are_private(new_tenant: Callable[..., TenantCtx], admin: httpx.Client) -> None:
    a, b = new_tenant(), new_tenant()
    listed = a.http.get("/v1/tenants")
    assert listed.status_code == 200, listed.text
    assert [(t["id"], t["name"]) for t in listed.json()["data"]] == [(a.id, a.name)]
    assert a.http.get(f"/v1/tenants/{a.name}").json()["id"] == a.id
    error = not_found(a.http.get(f"/v1/tenants/{b.name}"))
    assert b.id not in error["message"]
    not_found(a.http.get(f"/v1/tenants/{b.id}"))
    names = {t["name"] for t in admin.get("/v1/tenants").json()["data"]}
    assert {a.name, b.name} <= names


def test_restricted_model_exists_only_for_its_tenant(new_tenant: Callable[..., TenantCtx]) -> None:
    a, b = new_tenant(), new_tenant(RESTRICTED_TENANT)
    assert b.name == RESTRICTED_TENANT
    b_ids = {m.id for m in b.oai.models.list()}
    assert {RESTRICTED_MODEL, MODEL} <= b_ids
    assert b.oai.models.retrieve(RESTRICTED_MODEL).id == RESTRICTED_MODEL
    completion = chat(b, RESTRICTED_MODEL)
    assert completion.model == RESTRICTED_MODEL
    assert completion.choices[0].message.content

    a_ids = {m.id for m in a.oai.models.list()}
    assert MODEL in a_ids
    assert RESTRICTED_MODEL not in a_ids
    error = not_found(a.http.get(f"/v1/models/{RESTRICTED_MODEL}"))
    assert error["code"] == "model_not_found"
    assert RESTRICTED_MODEL not in error["message"].split("Available models:")[1]
    with pytest.raises(openai.NotFoundError) as caught:
        chat(a, RESTRICTED_MODEL)
    assert caught.value.code == "model_not_found"
    assert caught.value.param == "model"
    stream = a.http.post(
        "/v1/chat/completions",
        json={"model": RESTRICTED_MODEL, "messages": HELLO, "max_tokens": 2, "stream": True},
    )
    assert not_found(stream)["code"] == "model_not_found"


def test_restricted_model_cannot_enter_a_profile(new_tenant: Callable[..., TenantCtx]) -> None:
    a = new_tenant()
    error = not_found(a.http.put("/v1/model-profiles/chat", json={"models": [MODEL, RESTRICTED_MODEL]}))
    assert error["code"] == "model_not_found"
    assert a.http.get("/v1/model-profiles").json()["data"] == []


def test_model_profiles_are_per_tenant(new_tenant: Callable[..., TenantCtx]) -> None:
    a, b = new_tenant(), new_tenant()
    put = a.http.put("/v1/model-profiles/chat", json={"models": [MODEL]})
    assert put.status_code == 200, put.text
    assert put.json()["tenant_id"] == a.id
    assert [p["role"] for p in a.http.get("/v1/model-profiles").json()["data"]] == ["chat"]
    assert "profile:chat" in {m.id for m in a.oai.models.list()}

    assert b.http.get("/v1/model-profiles").json()["data"] == []
    assert "profile:chat" not in {m.id for m in b.oai.models.list()}
    with pytest.raises(openai.NotFoundError):
        chat(b, "profile:chat")
    # A cannot write or read B's profiles by naming B.
    not_found(a.http.put("/v1/model-profiles/code", json={"models": [MODEL], "tenant": b.name}))
    not_found(a.http.get("/v1/model-profiles", params={"tenant": b.name}))
    not_found(a.http.delete("/v1/model-profiles/chat", params={"tenant": b.name}))
    assert b.http.get("/v1/model-profiles").json()["data"] == []
    # ...and B deleting "its" chat profile does not touch A's.
    not_found(b.http.delete("/v1/model-profiles/chat"))
    assert chat(a, "profile:chat").model == MODEL
