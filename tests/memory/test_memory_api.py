"""`/v1/memory` over HTTP on the real embedding model: remember, recall, RAG, near-duplicate merge,
TTL, metadata filters, list/get/delete/export, validation, and tenant isolation."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx

from tests.conftest import TenantCtx
from tests.support.contract import error_of
from tests.support.processes import SomaServer

FACTS = [
    "The office Wi-Fi password is changed on the first Monday of every month.",
    "Alice is allergic to peanuts.",
    "The quarterly report is due on March 31.",
    "Our production database runs PostgreSQL 15 on two replicas.",
    "Bob prefers tea over coffee in the morning.",
    "The company picnic will be held at Lakeside Park.",
    "Deployments are frozen every Friday after 3 pm.",
    "The support hotline number is 555-0199.",
]


def remember(http: httpx.Client, text: str, **extra: Any) -> dict[str, Any]:
    response = http.post("/v1/memory/remember", json={"text": text, **extra})
    assert response.status_code == 201, response.text
    return dict(response.json())


def recall(http: httpx.Client, query: str, **extra: Any) -> list[dict[str, Any]]:
    response = http.post("/v1/memory/recall", json={"query": query, **extra})
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


def test_remember_then_recall_finds_the_right_fact(tenant: TenantCtx) -> None:
    ids = {remember(tenant.http, fact)["id"]: fact for fact in FACTS}
    cases = {
        "What is Alice allergic to?": "Alice is allergic to peanuts.",
        "When is the quarterly report due?": "The quarterly report is due on March 31.",
        "Which database do we use in production?": FACTS[3],
        "Can I deploy on Friday afternoon?": "Deployments are frozen every Friday after 3 pm.",
        "What does Bob drink in the morning?": "Bob prefers tea over coffee in the morning.",
    }
    for query, expected in cases.items():
        found = recall(tenant.http, query, top_k=3)
        assert found[0]["text"] == expected, (query, [f["text"] for f in found])
        assert ids[found[0]["id"]] == expected
        assert found[0]["score"] >= found[-1]["score"]
        assert -1 <= found[0]["similarity"] <= 1


def test_rag_gives_a_cited_prompt_ready_context(tenant: TenantCtx) -> None:
    for fact in FACTS:
        remember(tenant.http, fact)
    response = tenant.http.post("/v1/memory/rag", json={"query": "Where is the picnic?", "top_k": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [p["n"] for p in body["passages"]] == [1, 2]
    assert body["passages"][0]["text"] == "The company picnic will be held at Lakeside Park."
    assert "[1] The company picnic will be held at Lakeside Park." in body["context"]
    assert "cite them as [n]" in body["context"]
    empty = tenant.http.post("/v1/memory/rag", json={"query": "x", "namespace": "nothing-here"}).json()
    assert empty["context"] == "" and empty["passages"] == []


def test_near_duplicates_are_merged_not_added(tenant: TenantCtx) -> None:
    first = remember(tenant.http, "Alice is allergic to peanuts.", metadata={"source": "hr"})
    again = remember(tenant.http, "Alice is allergic to peanuts!", metadata={"checked": True})
    assert again["merged"] is True
    assert again["id"] == first["id"]
    assert again["text"] == "Alice is allergic to peanuts!"
    assert again["metadata"] == {"source": "hr", "checked": True}
    other = remember(tenant.http, "Alice likes hiking on weekends.")
    assert other["merged"] is False
    listed = tenant.http.get("/v1/memory").json()
    assert len(listed["data"]) == 2


def test_namespaces_filters_and_min_score(tenant: TenantCtx) -> None:
    remember(
        tenant.http, "Alice's favourite colour is green.", namespace="user:alice", metadata={"kind": "pref"}
    )
    remember(
        tenant.http, "Alice works in the Berlin office.", namespace="user:alice", metadata={"kind": "fact"}
    )
    remember(tenant.http, "Bob's favourite colour is blue.", namespace="user:bob", metadata={"kind": "pref"})
    alice = recall(tenant.http, "favourite colour", namespace="user:alice", top_k=5)
    assert {m["namespace"] for m in alice} == {"user:alice"}
    assert len(alice) == 2
    prefs = recall(tenant.http, "favourite colour", namespace="user:alice", filter={"kind": "pref"})
    assert [m["text"] for m in prefs] == ["Alice's favourite colour is green."]
    either = recall(
        tenant.http, "favourite colour", namespace="user:alice", filter={"kind": ["pref", "fact"]}
    )
    assert len(either) == 2
    assert recall(tenant.http, "favourite colour", namespace="user:alice", min_score=0.99) == []
    assert recall(tenant.http, "favourite colour") == []  # the default namespace is empty


def test_ttl_forgets(tenant: TenantCtx) -> None:
    kept = remember(tenant.http, "The launch code word is lighthouse.")
    brief = remember(tenant.http, "Today's visitor badge colour is orange.", ttl_seconds=1)
    assert brief["expires_at"] is not None
    time.sleep(1.3)
    texts = [m["text"] for m in recall(tenant.http, "visitor badge colour", top_k=5)]
    assert "Today's visitor badge colour is orange." not in texts
    assert kept["text"] in texts
    error_of(tenant.http.get(f"/v1/memory/{brief['id']}"), 404)


def test_list_get_delete_export(tenant: TenantCtx) -> None:
    made = [remember(tenant.http, fact, metadata={"i": i}) for i, fact in enumerate(FACTS[:5])]
    page = tenant.http.get("/v1/memory", params={"limit": 2}).json()
    assert len(page["data"]) == 2 and page["has_more"] is True
    rest = tenant.http.get("/v1/memory", params={"limit": 10, "after": page["data"][-1]["id"]}).json()
    assert len(rest["data"]) == 3 and rest["has_more"] is False
    got = tenant.http.get(f"/v1/memory/{made[0]['id']}")
    assert got.status_code == 200 and got.json()["metadata"] == {"i": 0}
    deleted = tenant.http.delete(f"/v1/memory/{made[1]['id']}")
    assert deleted.status_code == 200
    error_of(tenant.http.get(f"/v1/memory/{made[1]['id']}"), 404)
    assert made[1]["text"] not in [m["text"] for m in recall(tenant.http, made[1]["text"], top_k=5)]
    export = tenant.http.get("/v1/memory/export")
    assert export.status_code == 200
    assert export.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in export.text.splitlines()]
    assert sorted(m["id"] for m in lines) == sorted(m["id"] for i, m in enumerate(made) if i != 1)


def test_bad_input_is_a_clear_400(tenant: TenantCtx) -> None:
    cases = [
        ("/v1/memory/remember", {"text": ""}, "text"),
        ("/v1/memory/remember", {"text": "x", "namespace": "bad namespace!"}, "namespace"),
        ("/v1/memory/remember", {"text": "x", "ttl_seconds": 0}, "ttl_seconds"),
        ("/v1/memory/remember", {"text": "x", "colour": "red"}, "colour"),
        ("/v1/memory/recall", {"query": "x", "top_k": 0}, "top_k"),
        ("/v1/memory/recall", {"query": ""}, "query"),
        ("/v1/memory/rag", {"query": "x", "min_score": 2}, "min_score"),
    ]
    for path, body, param in cases:
        assert error_of(tenant.http.post(path, json=body), 400)["param"] == param, body
    assert error_of(tenant.http.get("/v1/memory", params={"limit": 0}), 400)["param"] == "limit"
    # nothing accepted before the errors was lost
    remember(tenant.http, "Still here after bad requests.")
    assert recall(tenant.http, "still here")[0]["text"] == "Still here after bad requests."


def test_a_tenant_never_sees_another_tenants_memories(new_tenant: Callable[..., TenantCtx]) -> None:
    a, b = new_tenant(), new_tenant()
    secret = remember(b.http, "Tenant B's launch date is June 5.", namespace="default")
    remember(a.http, "Tenant A has a blue logo.")
    assert [m["text"] for m in recall(a.http, "launch date", top_k=10)] == ["Tenant A has a blue logo."]
    rag = a.http.post("/v1/memory/rag", json={"query": "launch date"}).json()
    assert "June 5" not in rag["context"]
    error_of(a.http.get(f"/v1/memory/{secret['id']}"), 404)
    error_of(a.http.delete(f"/v1/memory/{secret['id']}"), 404)
    assert all(m["id"] != secret["id"] for m in a.http.get("/v1/memory").json()["data"])
    assert secret["id"] not in a.http.get("/v1/memory/export").text
    # B still has it
    assert recall(b.http, "launch date")[0]["id"] == secret["id"]


def test_memory_embeddings_are_metered(tenant: TenantCtx) -> None:
    remember(tenant.http, "Metered fact.")
    recall(tenant.http, "metered")
    rows = tenant.http.get("/v1/usage").json()["data"]
    embedding = [r for r in rows if r["model"] == "all-minilm-l6-v2"]
    assert embedding and embedding[0]["requests"] == 2 and embedding[0]["prompt_tokens"] > 0


def test_reindex_re_embeds_and_running_servers_keep_answering(server: SomaServer, tenant: TenantCtx) -> None:
    made = [remember(tenant.http, fact, namespace="reindexed") for fact in FACTS[:4]]
    unchanged = server.soma("memory", "reindex", "--tenant", tenant.name, "--namespace", "reindexed")
    assert unchanged.returncode == 0, unchanged.stderr
    assert "re-embedded 0 memories" in unchanged.stdout  # all made by the configured model already
    forced = server.soma("memory", "reindex", "--tenant", tenant.name, "--namespace", "reindexed", "--all")
    assert forced.returncode == 0, forced.stderr
    assert "re-embedded 4 memories" in forced.stdout
    # The server's index applies the new versions on its next search: still one entry per memory.
    found = recall(tenant.http, "What is Alice allergic to?", namespace="reindexed", top_k=10)
    assert [m["id"] for m in found].count(made[1]["id"]) == 1
    assert found[0]["text"] == FACTS[1]
    assert len(found) == 4
    unknown = server.soma("memory", "reindex", "--tenant", "no-such-tenant")
    assert unknown.returncode == 1 and "no tenant" in unknown.stderr


def test_memory_and_the_local_chat_model_share_a_process(tenant: TenantCtx) -> None:
    # Regression: a vector engine that brings its own C++ runtime broke llama.cpp's model loading.
    remember(tenant.http, "The chat model must still load after memory was used.")
    assert recall(tenant.http, "chat model load")
    completion = tenant.oai.chat.completions.create(
        model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert completion.choices[0].message.content is not None
