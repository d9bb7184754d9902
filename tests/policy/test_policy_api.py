"""Policy over HTTP on a real server and the real SmolLM2 model: versioned rules, decisions with reasons
and spans, the enforcement points (chat input, streamed output, agent runs, memory writes), strikes and
lockout, fail-closed, and tenant isolation."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from somaagent.api.constitution_signer import platform_signer
from somaagent.config import Settings
from somaagent.db.engine import create_engine
from somaagent.policy.constitution_signing import ConstitutionSigner
from tests.conftest import TenantCtx
from tests.support.processes import SomaServer
from tests.support.sse import events

MODEL = "smollm2-135m-instruct"
CARD = "4111 1111 1111 1111"  # passes Luhn
NOT_A_CARD = "4111 1111 1111 1112"


def put_policy(http: httpx.Client, document: dict[str, Any], **fields: Any) -> dict[str, Any]:
    response = http.put("/v1/policy", json={"document": document, **fields})
    assert response.status_code == 200, response.text
    return dict(response.json())


def evaluate(http: httpx.Client, **body: Any) -> dict[str, Any]:
    response = http.post("/v1/policy/evaluate", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def database_url(server: SomaServer) -> str:
    return server.env.get("SOMA_DATABASE_URL") or f"sqlite+aiosqlite:///{server.data_dir / 'soma.db'}"


def sql(server: SomaServer, statement: str, **params: Any) -> list[Any]:
    async def run() -> list[Any]:
        engine = create_engine(database_url(server))
        try:
            async with engine.begin() as conn:
                result = await conn.execute(text(statement), params)
                return list(result.fetchall()) if result.returns_rows else []
        finally:
            await engine.dispose()

    return asyncio.run(run())


def decisions(server: SomaServer, tenant_id: str, action: str) -> list[dict[str, Any]]:
    """The tenant's `policy.decisions` events of one action, oldest first (they are buffered: wait)."""
    deadline = time.monotonic() + 5
    found: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        rows = sql(
            server,
            "SELECT data FROM outbox WHERE topic = 'policy.decisions' AND tenant_id = :t ORDER BY seq",
            t=tenant_id,
        )
        found = [d for d in (json.loads(r[0]) if isinstance(r[0], str) else r[0] for r in rows)]
        found = [d for d in found if d["action"] == action]
        if found:
            return found
        time.sleep(0.1)
    return found


GUARDS = {
    "rules": [
        {"id": "cards", "kind": "pii", "detectors": ["card"], "severity": "high"},
        {"id": "spam", "kind": "keywords", "words": ["lottery"], "weight": 0.3, "severity": "low"},
        {"id": "scam", "kind": "keywords", "words": ["wire transfer"], "weight": 0.3, "severity": "medium"},
    ],
    "threshold": 0.5,
}


def test_policy_versions_rules_and_conflicts(tenant: TenantCtx, new_tenant: Callable[..., TenantCtx]) -> None:
    start = tenant.http.get("/v1/policy").json()
    assert start["version"] == 0 and start["document"]["rules"] == []
    v1 = put_policy(tenant.http, GUARDS)
    assert v1["version"] == 1 and [r["id"] for r in v1["document"]["rules"]] == ["cards", "spam", "scam"]

    added = tenant.http.post(
        "/v1/policy/rules", json={"id": "no-gpt", "kind": "model_allowlist", "models": [MODEL]}
    )
    assert added.status_code == 201, added.text
    assert added.json()["version"] == 2
    replaced = tenant.http.put("/v1/policy/rules/spam", json={"kind": "keywords", "words": ["jackpot"]})
    assert replaced.status_code == 200 and replaced.json()["rule"]["words"] == ["jackpot"]
    removed = tenant.http.delete("/v1/policy/rules/no-gpt")
    assert removed.status_code == 200 and removed.json()["version"] == 4
    assert [v["version"] for v in tenant.http.get("/v1/policy/versions").json()["data"]] == [4, 3, 2, 1]
    assert tenant.http.get("/v1/policy/versions/1").json()["document"]["rules"][1]["words"] == ["lottery"]

    # An edit from a stale version is refused rather than silently overwriting the newer one.
    stale = tenant.http.put("/v1/policy", json={"document": GUARDS, "base_version": 2})
    assert stale.status_code == 409 and stale.json()["error"]["code"] == "policy_version_conflict"
    bad = tenant.http.post("/v1/policy/rules", json={"id": "bad", "kind": "regex", "pattern": "(a+)+$"})
    assert bad.status_code == 400 and "pattern" in (bad.json()["error"]["param"] or "")
    assert (
        tenant.http.post(
            "/v1/policy/rules", json={"id": "cards", "kind": "pii", "detectors": ["email"]}
        ).status_code
        == 409
    )
    assert tenant.http.get("/v1/policy").json()["version"] == 4  # nothing refused was stored

    other = new_tenant()
    assert other.http.get("/v1/policy").json()["version"] == 0  # tenants do not see each other's policy
    assert other.http.get("/v1/policy/versions/1").status_code == 404
    assert other.http.delete("/v1/policy/rules/cards").status_code == 404


def test_evaluate_scores_reasons_and_spans(tenant: TenantCtx, server: SomaServer) -> None:
    put_policy(tenant.http, GUARDS)
    content = f"my card is {CARD}, thanks"
    denied = evaluate(tenant.http, action="chat.input", content=content, dry_run=True)
    assert denied["allowed"] is False and denied["score"] == 1.0 and denied["severity"] == "high"
    card = next(r for r in denied["reasons"] if r["rule"] == "cards")
    assert card["code"] == "pii.card" and content[card["span"][0] : card["span"][1]] == CARD
    assert denied["policy_version"] == 1 and len(denied["constitution_hash"]) == 64

    assert evaluate(tenant.http, action="chat.input", content=f"not a card: {NOT_A_CARD}")["allowed"] is True
    one = evaluate(tenant.http, action="chat.input", content="win the lottery")
    assert one["allowed"] is True and one["score"] == pytest.approx(0.3) and one["severity"] == "low"
    two = evaluate(tenant.http, action="chat.input", content="win the lottery by wire transfer")
    assert two["allowed"] is False and two["score"] == pytest.approx(0.51) and two["severity"] == "medium"

    # Asking about someone else needs policy:admin; a member key may only ask about itself.
    member = tenant.http.post("/v1/keys", json={"name": "m", "role": "member"}).json()["key"]
    with httpx.Client(base_url=server.base_url, headers={"authorization": f"Bearer {member}"}) as http:
        assert (
            http.post("/v1/policy/evaluate", json={"action": "x", "subject": "user:someone"}).status_code
            == 403
        )
        assert (
            http.post("/v1/policy/evaluate", json={"action": "x", "content": "hi"}).json()["allowed"] is True
        )
        assert http.get("/v1/policy").status_code == 403
    # Every decision is an event naming what was scanned (length and digest, not the text).
    events_ = decisions(server, tenant.id, "chat.input")
    assert events_ and events_[0]["scanned"]["chars"] == len(content) and events_[0]["allowed"] is False
    assert CARD not in json.dumps(events_)


def test_chat_input_denied_before_any_model_call(tenant: TenantCtx) -> None:
    put_policy(tenant.http, GUARDS)
    response = tenant.http.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": f"charge {CARD} please"}],
            "max_tokens": 5,
        },
    )
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert error["code"] == "policy_denied" and error["type"] == "permission_error"
    assert error["decision"]["reasons"][0]["code"] == "pii.card"
    assert CARD not in error["message"]


FORCED = "Here is the harmless beginning of a reply that is long enough to be shown before the bad word"
FORCED_TEXT = FORCED + " kaboom and what follows it."


def test_streamed_output_is_stopped_mid_stream_by_a_deny_rule(tenant: TenantCtx, server: SomaServer) -> None:
    put_policy(
        tenant.http,
        {
            "rules": [{"id": "boom", "kind": "keywords", "words": ["kaboom"], "actions": ["model.output"]}],
            "stream": {"holdback_chars": 16, "window_chars": 256},
        },
    )
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say the sentence."}],
        "max_tokens": 60,
        "temperature": 0,
        "stream": True,
        # The grammar makes the model write exactly this string, token by token.
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "s", "schema": {"type": "string", "enum": [FORCED_TEXT]}},
        },
    }
    with tenant.http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        lines = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
        frames = [json.loads(line) if line != "[DONE]" else line for line in lines]
    chunks = [f for f in frames if isinstance(f, dict) and f.get("object") == "chat.completion.chunk"]
    shown = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert len(shown) > 20 and FORCED.startswith(shown.lstrip('"'))  # text flowed before the denial
    assert "kaboom" not in shown and "boom" not in shown[-8:]  # none of the denied word was shown
    assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter"
    error = next(f for f in frames if isinstance(f, dict) and "error" in f)["error"]
    assert error["code"] == "policy_denied" and error["decision"]["reasons"][0]["rule"] == "boom"
    assert frames[-1] == "[DONE]"
    denied = [d for d in decisions(server, tenant.id, "model.output") if not d["allowed"]]
    assert denied and denied[0]["scanned"]["chars"] >= len(FORCED)


def test_non_streamed_output_denied_whole(tenant: TenantCtx) -> None:
    put_policy(tenant.http, {"rules": [{"id": "boom", "kind": "keywords", "words": ["kaboom"]}]})
    response = tenant.http.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "Say it."}],
            "max_tokens": 60,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "s", "schema": {"type": "string", "enum": [FORCED_TEXT]}},
            },
        },
    )
    assert response.status_code == 403 and response.json()["error"]["code"] == "policy_denied"


def _session(http: httpx.Client, persona: str | None = None) -> str:
    created = http.post("/v1/sessions", json={"persona": persona} if persona else {})
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def _run(http: httpx.Client, session_id: str, content: str, **fields: Any) -> list[dict[str, Any]]:
    with http.stream(
        "POST", f"/v1/sessions/{session_id}/messages", json={"content": content, **fields}
    ) as response:
        assert response.status_code == 200, response.read()
        return list(events(response))


def test_agent_run_input_and_streamed_output_are_checked(tenant: TenantCtx) -> None:
    assert (
        tenant.http.post(
            "/v1/personas", json={"name": "plain", "tools": [], "memory": {"recall": False, "remember": []}}
        ).status_code
        == 201
    )
    put_policy(
        tenant.http,
        {
            "rules": [
                {"id": "cards", "kind": "pii", "detectors": ["card"], "actions": ["run.input"]},
                {
                    "id": "max",
                    "kind": "keywords",
                    "words": ["Max"],
                    "actions": ["model.output"],
                    "ignore_case": False,
                },
            ],
            "stream": {"holdback_chars": 8, "window_chars": 256},
        },
    )
    session_id = _session(tenant.http, "plain")
    refused = tenant.http.post(f"/v1/sessions/{session_id}/messages", json={"content": f"card {CARD}"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "policy_denied"
    assert tenant.http.get(f"/v1/sessions/{session_id}/history").json()["data"] == []  # refused: not stored

    stream = _run(
        tenant.http,
        session_id,
        "Write a short story about a dog named Max.",
        max_tokens=120,
        temperature=0,
        seed=3,
    )
    kinds = [e["type"] for e in stream if e["type"] != "assistant.delta"]
    assert kinds[-2:] == ["policy.denied", "run.failed"], kinds
    assert stream[-1]["data"]["reason"] == "policy_denied"
    denial = next(e for e in stream if e["type"] == "policy.denied")["data"]
    assert denial["action"] == "model.output" and denial["reasons"][0]["rule"] == "max"
    shown = "".join(e["data"]["text"] for e in stream if e["type"] == "assistant.delta")
    assert "Max" not in shown
    # The session is free again and its history holds the user's turn.
    history = tenant.http.get(f"/v1/sessions/{session_id}/history").json()["data"]
    assert [m["role"] for m in history] == ["user"]


def test_memory_write_is_checked(tenant: TenantCtx) -> None:
    put_policy(
        tenant.http,
        {"rules": [{"id": "cards", "kind": "pii", "detectors": ["card"], "actions": ["memory.write"]}]},
    )
    refused = tenant.http.post("/v1/memory/remember", json={"text": f"my card is {CARD}"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "policy_denied"
    kept = tenant.http.post("/v1/memory/remember", json={"text": "I like green tea"})
    assert kept.status_code in (200, 201), kept.text


def test_repeated_denials_lock_the_subject_out_until_an_admin_resets(
    tenant: TenantCtx, server: SomaServer
) -> None:
    put_policy(
        tenant.http,
        {
            "rules": [{"id": "cards", "kind": "pii", "detectors": ["card"]}],
            "moderation": {"threshold": 3, "window_s": 600, "lockout_s": 600},
        },
    )
    member = tenant.http.post("/v1/keys", json={"name": "m", "role": "member"}).json()
    subject = f"key:{member['id']}"
    with httpx.Client(base_url=server.base_url, headers={"authorization": f"Bearer {member['key']}"}) as http:
        for _ in range(3):
            assert evaluate(http, action="chat.input", content=CARD)["allowed"] is False
        locked = evaluate(http, action="chat.input", content="a harmless question")
        assert locked["allowed"] is False and locked["reasons"][0]["code"] == "moderation_locked"
        chat = http.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        )
        assert chat.status_code == 403 and chat.json()["error"]["code"] == "moderation_locked"
        listed = tenant.http.get("/v1/policy/strikes").json()["data"]
        assert any(s["subject"] == subject and s["count"] == 3 and s["locked_until"] for s in listed)
        # Dry runs (an admin trying a policy out) do not count.
        assert (
            tenant.http.post(
                "/v1/policy/evaluate", json={"action": "x", "content": CARD, "dry_run": True}
            ).status_code
            == 200
        )
        assert tenant.http.delete(f"/v1/policy/strikes/{subject}").status_code == 200
        assert evaluate(http, action="chat.input", content="a harmless question")["allowed"] is True
    assert tenant.http.delete(f"/v1/policy/strikes/{subject}").status_code == 404
    audit = tenant.http.get("/v1/audit", params={"type": "moderation.reset"})
    assert audit.status_code == 200 and audit.json()["data"], audit.text


def test_an_evaluation_that_errors_fails_closed_or_open_as_configured(
    new_tenant: Callable[..., TenantCtx], server: SomaServer
) -> None:
    closed, open_ = new_tenant(), new_tenant()
    put_policy(closed.http, {"rules": []})
    put_policy(open_.http, {"rules": [], "fail_closed": False})
    for ctx in (closed, open_):
        assert evaluate(ctx.http, action="x", content="hi")["allowed"] is True
        # Break the tenant's policy in the database: its newest version no longer parses.
        sql(
            server,
            "INSERT INTO policy_versions (tenant_id, version, document, created_at, created_by) "
            "VALUES (:t, 2, :d, CURRENT_TIMESTAMP, 'tamper')",
            t=ctx.id,
            d=json.dumps({"rules": [{"id": "x", "kind": "no-such-kind"}]}),
        )
    time.sleep(1.5)  # past every replica's cache TTL
    refused = evaluate(closed.http, action="x", content="hi")
    assert refused["allowed"] is False and refused["reasons"][0]["code"] == "evaluation_error"
    allowed = evaluate(open_.http, action="x", content="hi")
    assert allowed["allowed"] is True and allowed["reasons"][0]["code"] == "evaluation_error"

    # A constitution that fails verification denies even where the tenant's policy fails open.
    signed = open_.http.get("/v1/constitution").json()
    sql(
        server,
        "INSERT INTO constitutions (tenant_id, version, document, sha256, signature, signing_key_id, "
        "created_at, created_by) VALUES (:t, 1, :d, :h, :s, :k, CURRENT_TIMESTAMP, 'tamper')",
        t=open_.id,
        d=json.dumps({"name": "forged", "principles": [], "rules": []}),
        h=signed["sha256"],
        s=signed["signature"],
        k=signed["signing_key_id"],
    )
    time.sleep(1.5)
    forged = evaluate(open_.http, action="x", content="hi")
    assert forged["allowed"] is False and forged["reasons"][0]["code"] == "evaluation_error"


def _signer(server: SomaServer) -> ConstitutionSigner:
    settings = Settings(data_dir=server.data_dir, secret_key=server.env.get("SOMA_SECRET_KEY"))
    return platform_signer(settings.resolved_secret_key())


def test_constitution_rules_bind_and_a_session_learns_of_a_new_constitution(
    tenant: TenantCtx, server: SomaServer, admin: httpx.Client
) -> None:
    assert (
        tenant.http.post(
            "/v1/personas", json={"name": "plain", "tools": [], "memory": {"recall": False, "remember": []}}
        ).status_code
        == 201
    )
    session_id = _session(tenant.http, "plain")
    first = _run(tenant.http, session_id, "Hello there", max_tokens=4, temperature=0)
    assert first[-1]["type"] == "run.completed"
    old_hash = tenant.http.get("/v1/constitution").json()["sha256"]

    document = {
        "name": "acme",
        "principles": ["Never help plan an exploit."],
        "rules": [{"id": "exploits", "kind": "keywords", "words": ["zero day"], "severity": "critical"}],
    }
    put = admin.put(
        "/v1/constitution", json=_signer(server).sign(document).to_json() | {"tenant": tenant.name}
    )
    assert put.status_code == 200, put.text
    new_hash = put.json()["sha256"]
    # A tenant rule that allows everyone does not lift a constitution rule.
    put_policy(
        tenant.http, {"rules": [{"id": "all", "kind": "allow_list", "field": "subject", "values": ["*"]}]}
    )
    time.sleep(1.2)  # past the cache TTL
    decided = evaluate(tenant.http, action="chat.input", content="sell me a zero day", dry_run=True)
    assert decided["allowed"] is False and decided["constitution_hash"] == new_hash
    assert decided["reasons"][0]["rule"] == "constitution:exploits"

    second = _run(tenant.http, session_id, "Hello again", max_tokens=4, temperature=0)
    changed = next(e for e in second if e["type"] == "constitution.changed")["data"]
    assert changed["previous_hash"] == old_hash and changed["constitution_hash"] == new_hash
    assert changed["reevaluated"]["allowed"] is True
    third = _run(tenant.http, session_id, "And again", max_tokens=4, temperature=0)
    assert not any(e["type"] == "constitution.changed" for e in third)  # told once


def test_documents_and_imported_histories_are_checked_too(tenant: TenantCtx) -> None:
    put_policy(
        tenant.http,
        {
            "rules": [
                {
                    "id": "cards",
                    "kind": "pii",
                    "detectors": ["card"],
                    "actions": ["memory.write", "run.input"],
                }
            ]
        },
    )
    document = {"name": "cards.txt", "text": f"the corporate card is {CARD}", "media_type": "text/plain"}
    refused = tenant.http.post("/v1/memory/documents", json=document)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "policy_denied"
    assert tenant.http.get("/v1/memory/documents").json()["data"] == []  # nothing was stored

    assert (
        tenant.http.post(
            "/v1/personas", json={"name": "plain", "tools": [], "memory": {"recall": False, "remember": []}}
        ).status_code
        == 201
    )
    imported = tenant.http.post(
        "/v1/sessions/import",
        json={"persona": "plain", "messages": [{"role": "user", "content": f"remember my card {CARD}"}]},
    )
    assert imported.status_code == 201, imported.text
    # The history no rule has seen is decided on the session's first run, and refused with it.
    run = tenant.http.post(f"/v1/sessions/{imported.json()['id']}/messages", json={"content": "hello"})
    assert run.status_code == 403 and run.json()["error"]["code"] == "policy_denied"
    assert "history" in run.json()["error"]["message"]
