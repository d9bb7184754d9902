"""`/v1/models` and `/v1/model-profiles`: what a tenant may use, and `profile:<role>` with fallback
through a real dead upstream (a refused connection) to the local model."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.conftest import DEAD_MODEL, RESTRICTED_MODEL, TenantCtx
from tests.support.contract import error_of, validate

CHAT = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"
HELLO = [{"role": "user", "content": "Say hello."}]


def put_profile(tenant: TenantCtx, role: str, models: list[str]) -> dict[str, Any]:
    response = tenant.http.put(f"/v1/model-profiles/{role}", json={"models": models})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert body["object"] == "model_profile"
    assert body["tenant_id"] == tenant.id
    assert (body["role"], body["model"], body["models"]) == (role, f"profile:{role}", models)
    return body


def model_ids(tenant: TenantCtx) -> list[str]:
    return [m.id for m in tenant.oai.models.list()]


def test_models_list_and_retrieve_validate_against_the_contract(tenant: TenantCtx) -> None:
    raw = tenant.http.get("/v1/models")
    assert raw.status_code == 200
    validate(raw.json(), "ListModelsResponse")
    for model in raw.json()["data"]:
        validate(model, "Model")
    listed = tenant.oai.models.list()
    ids = [m.id for m in listed]
    assert ids[:2] == [CHAT, EMBED]
    assert DEAD_MODEL in ids  # unrestricted: every tenant sees it
    assert RESTRICTED_MODEL not in ids
    assert all(m.owned_by == "somaagent" for m in listed if m.id in (CHAT, EMBED))
    retrieved = tenant.oai.models.retrieve(CHAT)
    validate(retrieved.model_dump(exclude_unset=True), "Model")
    assert (retrieved.id, retrieved.object) == (CHAT, "model")
    assert retrieved.created > 0


def test_retrieving_an_unknown_model_is_404(tenant: TenantCtx) -> None:
    error = error_of(tenant.http.get("/v1/models/gpt-99"), 404)
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    assert CHAT in error["message"]
    with pytest.raises(openai.NotFoundError):
        tenant.oai.models.retrieve("gpt-99")


def test_dead_upstream_alone_is_a_502(tenant: TenantCtx) -> None:
    body = {"model": DEAD_MODEL, "messages": HELLO, "max_tokens": 2}
    error = error_of(tenant.http.post("/v1/chat/completions", json=body), 502)
    assert error["type"] == "server_error"
    assert error["code"] == "upstream_error"


def test_chat_profile_falls_through_the_dead_upstream(tenant: TenantCtx) -> None:
    assert tenant.http.get("/v1/model-profiles").json() == {"object": "list", "data": []}
    put_profile(tenant, "chat", [DEAD_MODEL, CHAT])
    assert "profile:chat" in model_ids(tenant)
    listed = tenant.http.get("/v1/model-profiles").json()["data"]
    assert [(p["role"], p["models"]) for p in listed] == [("chat", [DEAD_MODEL, CHAT])]
    retrieved = tenant.oai.models.retrieve("profile:chat")
    assert (retrieved.id, retrieved.owned_by) == ("profile:chat", "somaagent-profile")

    completion = tenant.oai.chat.completions.create(model="profile:chat", messages=HELLO, max_tokens=4)
    validate(completion.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    assert completion.model == CHAT
    assert completion.choices[0].message.content

    stream = tenant.oai.chat.completions.create(
        model="profile:chat",
        messages=HELLO,
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert {c.model for c in chunks} == {CHAT}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_profile_put_replaces_and_delete_removes(tenant: TenantCtx) -> None:
    put_profile(tenant, "chat", [DEAD_MODEL, CHAT])
    put_profile(tenant, "chat", [CHAT])
    assert [p["models"] for p in tenant.http.get("/v1/model-profiles").json()["data"]] == [[CHAT]]
    answer = tenant.oai.chat.completions.create(model="profile:chat", messages=HELLO, max_tokens=2)
    assert answer.model == CHAT

    deleted = tenant.http.delete("/v1/model-profiles/chat")
    assert deleted.status_code == 204
    assert tenant.http.get("/v1/model-profiles").json()["data"] == []
    assert "profile:chat" not in model_ids(tenant)
    with pytest.raises(openai.NotFoundError) as caught:
        tenant.oai.chat.completions.create(model="profile:chat", messages=HELLO, max_tokens=2)
    assert caught.value.code == "model_not_found"
    assert "soma models profile set" in caught.value.message
    error_of(tenant.http.get("/v1/models/profile:chat"), 404)
    error_of(tenant.http.delete("/v1/model-profiles/chat"), 404)


def test_only_the_dead_upstream_in_a_profile_is_a_502(tenant: TenantCtx) -> None:
    put_profile(tenant, "code", [DEAD_MODEL])
    body = {"model": "profile:code", "messages": HELLO, "max_tokens": 2}
    assert error_of(tenant.http.post("/v1/chat/completions", json=body), 502)["code"] == "upstream_error"


@pytest.mark.parametrize(
    ("role", "models", "status", "param"),
    [
        pytest.param("chat", ["no-such-model"], 404, "model", id="unknown-model"),
        pytest.param("chat", [CHAT, "no-such-model"], 404, "model", id="unknown-fallback"),
        pytest.param("chat", [EMBED], 400, "models", id="embedding-model-as-chat"),
        pytest.param("embedding", [CHAT], 400, "models", id="chat-model-as-embedding"),
        pytest.param("villain", [CHAT], 400, "role", id="unknown-role"),
        pytest.param("chat", [], 400, "models", id="no-models"),
        pytest.param("chat", [CHAT] * 11, 400, "models", id="too-many-models"),
    ],
)
def test_bad_profile_is_refused_and_nothing_is_stored(
    tenant: TenantCtx, role: str, models: list[str], status: int, param: str
) -> None:
    error = error_of(tenant.http.put(f"/v1/model-profiles/{role}", json={"models": models}), status)
    assert error["param"] == param, error
    assert tenant.http.get("/v1/model-profiles").json()["data"] == []
    assert not any(m.startswith("profile:") for m in model_ids(tenant))


def test_unknown_role_is_400_when_used(tenant: TenantCtx) -> None:
    body = {"model": "profile:villain", "messages": HELLO, "max_tokens": 2}
    error = error_of(tenant.http.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == "role"
    assert "chat, planning, code, embedding" in error["message"]
    error_of(tenant.http.delete("/v1/model-profiles/villain"), 400)


def test_embedding_profile_serves_embeddings(tenant: TenantCtx) -> None:
    put_profile(tenant, "embedding", [EMBED])
    assert "profile:embedding" in model_ids(tenant)
    via_profile = tenant.http.post("/v1/embeddings", json={"model": "profile:embedding", "input": ["a", "b"]})
    assert via_profile.status_code == 200, via_profile.text
    validate(via_profile.json(), "CreateEmbeddingResponse")
    assert via_profile.json()["model"] == EMBED
    direct = tenant.http.post("/v1/embeddings", json={"model": EMBED, "input": ["a", "b"]}).json()
    for got, want in zip(via_profile.json()["data"], direct["data"], strict=True):
        assert max(abs(x - y) for x, y in zip(got["embedding"], want["embedding"], strict=True)) < 1e-6
    sdk = tenant.oai.embeddings.create(model="profile:embedding", input="hello")
    assert sdk.model == EMBED and len(sdk.data[0].embedding) == 384

    chat_body = {"model": "profile:embedding", "messages": HELLO, "max_tokens": 2}
    assert error_of(tenant.http.post("/v1/chat/completions", json=chat_body), 400)["param"] == "model"


def test_chat_profile_cannot_embed(tenant: TenantCtx) -> None:
    put_profile(tenant, "chat", [CHAT])
    body = {"model": "profile:chat", "input": "hello"}
    assert error_of(tenant.http.post("/v1/embeddings", json=body), 400)["param"] == "model"
    error_of(tenant.http.post("/v1/embeddings", json={"model": "profile:embedding", "input": "x"}), 404)


def test_profile_body_is_strict(tenant: TenantCtx) -> None:
    extra = {"models": [CHAT], "fallback": True}
    error = error_of(tenant.http.put("/v1/model-profiles/chat", json=extra), 400)
    assert error["param"] == "fallback"
    error = error_of(tenant.http.put("/v1/model-profiles/chat", json={"models": CHAT}), 400)
    assert error["param"] == "models"
