"""The other doors to a run: the WebSocket, `model="agent:<persona>"` on the OpenAI endpoint (bodies and
chunks valid against OpenAI's spec), and tools invoked directly (the sandbox, the SSRF guard, memory
search, the clock) with their `tool.calls` events."""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.agents.test_runs import FAST, new_session, persona, run, types
from tests.conftest import TenantCtx
from tests.support.contract import error_of, validate
from tests.support.processes import SomaServer


def ws_url(server: SomaServer, session_id: str) -> str:
    return server.base_url.replace("http://", "ws://") + f"/v1/sessions/{session_id}/ws"


def test_websocket_runs_and_streams(server: SomaServer, tenant: TenantCtx) -> None:
    persona(tenant.http, "clock")
    session_id = new_session(tenant.http, persona="clock")
    with connect(
        ws_url(server, session_id), additional_headers={"authorization": f"Bearer {tenant.key}"}
    ) as ws:
        ws.send(json.dumps({"type": "nonsense"}))
        error = json.loads(ws.recv(timeout=10))
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
        ws.send(json.dumps({"type": "message", "content": ""}))
        assert json.loads(ws.recv(timeout=10))["error"]["param"] == "content"
        ws.send(
            json.dumps(
                {
                    "type": "message",
                    "content": "What time is it?",
                    "tool_choice": {"type": "function", "name": "current_time"},
                    **FAST,
                }
            )
        )
        received: list[dict[str, Any]] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            message = json.loads(ws.recv(timeout=120))
            received.append(message)
            if message["type"] == "run.completed":
                break
    kinds = [m["type"] for m in received if m["type"] != "assistant.delta"]
    assert "run.accepted" in kinds
    assert [k for k in kinds if k != "run.accepted"] == [
        "run.started",
        "tool.call",
        "tool.result",
        "assistant.message",
        "run.completed",
    ]
    ids = [m["id"] for m in received if "id" in m]
    assert ids == sorted(ids)


def test_websocket_refuses_bad_keys_and_other_tenants(
    server: SomaServer, tenant: TenantCtx, new_tenant: Any
) -> None:
    session_id = new_session(tenant.http)
    with pytest.raises(InvalidStatus) as refused, connect(ws_url(server, session_id)):
        pass
    assert refused.value.response.status_code == 403  # closed before accept: no key
    other = new_tenant()
    foreign = {"authorization": f"Bearer {other.key}"}
    with pytest.raises(InvalidStatus), connect(ws_url(server, session_id), additional_headers=foreign):
        pass


def test_agent_model_on_the_openai_endpoint(tenant: TenantCtx) -> None:
    persona(tenant.http, "clock", tools=[])
    body = {
        "model": "agent:clock",
        "messages": [
            {"role": "system", "content": "ignored: the persona governs"},
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": "Hello Ada."},
            {"role": "user", "content": "What is my name?"},
        ],
        **FAST,
    }
    response = tenant.http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    completion = response.json()
    validate(completion, "CreateChatCompletionResponse")
    assert completion["model"] == "agent:clock" and completion["choices"][0]["finish_reason"] == "stop"
    assert completion["usage"]["completion_tokens"] > 0
    session_id = response.headers["x-soma-session-id"]
    history = tenant.http.get(f"/v1/sessions/{session_id}/history").json()["data"]
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[-1]["content"] == completion["choices"][0]["message"]["content"]

    # The same session continues with the header; only the last message is taken.
    again = tenant.http.post(
        "/v1/chat/completions",
        json={"model": "agent:clock", "messages": [{"role": "user", "content": "Thanks"}], **FAST},
        headers={"x-soma-session-id": session_id},
    )
    assert again.status_code == 200 and again.headers["x-soma-session-id"] == session_id
    assert len(tenant.http.get(f"/v1/sessions/{session_id}/history").json()["data"]) == 6

    chunks = list(
        tenant.oai.chat.completions.create(
            model="agent:clock",
            messages=[{"role": "user", "content": "Say hi"}],
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=12,
            seed=1,
        )
    )
    for chunk in chunks:
        validate(chunk.model_dump(exclude_unset=True), "CreateChatCompletionStreamResponse")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert any(c.choices and c.choices[0].finish_reason == "stop" for c in chunks)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0

    with pytest.raises(openai.NotFoundError):
        tenant.oai.chat.completions.create(model="agent:ghost", messages=[{"role": "user", "content": "x"}])
    tools = tenant.http.post(
        "/v1/chat/completions",
        json={
            "model": "agent:clock",
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
        },
    )
    assert error_of(tools, 400)["param"] == "tools"
    last = tenant.http.post(
        "/v1/chat/completions",
        json={"model": "agent:default", "messages": [{"role": "assistant", "content": "x"}]},
    )
    assert error_of(last, 400)["param"] == "messages"


def invoke(http: httpx.Client, name: str, **arguments: Any) -> dict[str, Any]:
    response = http.post(f"/v1/tools/{name}/invoke", json={"arguments": arguments})
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_tools_invoked_directly(server: SomaServer, tenant: TenantCtx) -> None:
    result = invoke(tenant.http, "python", code="print(sum(range(10)))")
    assert result == {**result, "content": "45\n", "is_error": False}
    escaped = invoke(tenant.http, "python", code="print(open('/etc/hostname').read())")
    assert "FileNotFoundError" in escaped["content"] or "No such file" in escaped["content"]
    # http_fetch is `external`, which waits for a person by default; this tenant opts it out.
    exempt = {"document": {"approvals": {"tools": {"http_fetch": "never"}}}}
    assert tenant.http.put("/v1/policy", json=exempt).status_code == 200
    blocked = invoke(tenant.http, "http_fetch", url=f"{server.base_url}/healthz")
    assert blocked["is_error"] is True and "127.0.0.1" in blocked["content"]
    bad = invoke(tenant.http, "http_fetch", url="file:///etc/passwd")
    assert bad["is_error"] is True and bad["error_code"] == "invalid_tool_arguments"
    clock = invoke(tenant.http, "current_time", timezone="Europe/Paris")
    assert json.loads(clock["content"])["timezone"] == "Europe/Paris"
    zone = invoke(tenant.http, "current_time", timezone="Mars/Olympus")
    assert zone["is_error"] is True and "unknown time zone" in zone["content"]
    tenant.http.post("/v1/memory/remember", json={"text": "The VPN gateway is vpn.example.net."})
    found = invoke(tenant.http, "memory_search", query="Which host is the VPN gateway?", top_k=1)
    assert "vpn.example.net" in found["content"]
    unknown = tenant.http.post("/v1/tools/nope/invoke", json={"arguments": {}})
    assert error_of(unknown, 404)["param"] == "name"

    if server.extra["backend"] == "sqlite":  # the outbox is read straight from the server's database
        deadline = time.monotonic() + 10
        rows: list[Any] = []
        while time.monotonic() < deadline and len(rows) < 6:
            with sqlite3.connect(server.data_dir / "soma.db") as db:
                rows = db.execute(
                    "SELECT data FROM outbox WHERE topic = 'tool.calls' AND tenant_id = ?", (tenant.id,)
                ).fetchall()
            time.sleep(0.1)
        calls = [json.loads(r[0]) for r in rows]
        assert {c["tool"] for c in calls} >= {"python", "http_fetch", "current_time", "memory_search"}
        assert all(len(c["args_sha256"]) == 64 and "code" not in c for c in calls)
        assert {c["outcome"] for c in calls} >= {"ok", "fetch_blocked", "invalid_tool_arguments"}


def test_a_run_calls_an_mcp_tool(admin: httpx.Client, tenant: TenantCtx) -> None:
    # An operator registers a stdio MCP server (it runs a command, so an admin key) for the tenant.
    command = [str(Path(sys.executable).parent / "mcp-server-time"), "--local-timezone", "UTC"]
    created = admin.post(
        "/v1/mcp-servers",
        params={"tenant": tenant.name},
        json={"name": "time", "transport": "stdio", "command": command},
    )
    assert created.status_code == 201, created.text
    listed = {t["name"]: t for t in tenant.http.get("/v1/tools").json()["data"]}
    assert listed["mcp.time.get_current_time"]["source"] == "mcp:time"
    persona(tenant.http, "mcp-clock", tools=["mcp.time.get_current_time"])
    session_id = new_session(tenant.http, persona="mcp-clock")
    stream = run(
        tenant.http,
        session_id,
        "What time is it in Europe/Paris?",
        tool_choice={"type": "function", "name": "mcp.time.get_current_time"},
    )
    assert types(stream) == ["run.started", "tool.call", "tool.result", "assistant.message", "run.completed"]
    result = next(e for e in stream if e["type"] == "tool.result")["data"]
    if result["is_error"]:  # the model picked a zone the server does not know: its own error came back
        assert "timezone" in result["content"].lower()
    else:
        assert "datetime" in json.loads(result["content"])
