"""Agent runs over HTTP on the real SmolLM2 model: a forced tool call streamed in order, replay with
`Last-Event-ID`, reconnecting mid-run, cancel, busy sessions, run limits, tool errors, history, memory
in runs, context trimming, export/import, and tenant isolation. Both database backends."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from tests.conftest import TenantCtx
from tests.support.contract import error_of
from tests.support.sse import events

# Short answers keep the real model's runs to a few seconds each.
FAST = {"max_tokens": 24, "temperature": 0, "seed": 7}
TIME_ONLY = {"tools": ["current_time"], "memory": {"recall": False, "remember": []}}


def persona(http: httpx.Client, name: str, **fields: Any) -> dict[str, Any]:
    body = {"name": name, **TIME_ONLY, **fields}
    response = http.post("/v1/personas", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json())


def new_session(http: httpx.Client, **fields: Any) -> str:
    response = http.post("/v1/sessions", json=fields)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def run(http: httpx.Client, session_id: str, content: str, **fields: Any) -> list[dict[str, Any]]:
    """Post a message and read its whole SSE stream."""
    with http.stream(
        "POST", f"/v1/sessions/{session_id}/messages", json={"content": content, **FAST, **fields}
    ) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(events(response))


def types(stream: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in stream if e["type"] != "assistant.delta"]


def test_forced_tool_run_streams_its_events_in_order(tenant: TenantCtx) -> None:
    persona(tenant.http, "clock")
    session_id = new_session(tenant.http, persona="clock")
    stream = run(
        tenant.http,
        session_id,
        "What time is it in Paris?",
        tool_choice={"type": "function", "name": "current_time"},
    )
    assert types(stream) == ["run.started", "tool.call", "tool.result", "assistant.message", "run.completed"]
    ids = [e["id"] for e in stream]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    run_id = stream[0]["run_id"]
    assert all(e["run_id"] == run_id and e["session_id"] == session_id for e in stream)
    call = next(e for e in stream if e["type"] == "tool.call")["data"]
    result = next(e for e in stream if e["type"] == "tool.result")["data"]
    assert call["name"] == "current_time" and result["call_id"] == call["call_id"]
    args = json.loads(call["arguments"])  # the grammar makes forced arguments valid JSON
    assert set(args) <= {"timezone"}
    if not result["is_error"]:
        assert "datetime" in json.loads(result["content"])
    deltas = "".join(e["data"]["text"] for e in stream if e["type"] == "assistant.delta")
    message = next(e for e in stream if e["type"] == "assistant.message")["data"]
    assert message["content"] == deltas
    done = stream[-1]["data"]
    assert done["steps"] == 2 and done["tool_calls"] == 1 and done["usage"]["completion_tokens"] > 0

    history = tenant.http.get(f"/v1/sessions/{session_id}/history").json()["data"]
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant"]
    assert history[0]["content"] == "What time is it in Paris?"
    assert history[1]["tool_calls"][0]["name"] == "current_time"
    assert history[2]["tool_call_id"] == call["call_id"]
    assert history[3]["content"] == message["content"]

    got = tenant.http.get(f"/v1/sessions/{session_id}/runs/{run_id}").json()
    assert got["status"] == "completed" and got["answer"] == message["content"] and got["tool_calls"] == 1
    assert tenant.http.get(f"/v1/sessions/{session_id}").json()["active_run_id"] is None


def test_replay_after_last_event_id(tenant: TenantCtx) -> None:
    persona(tenant.http, "clock")
    session_id = new_session(tenant.http, persona="clock")
    stream = run(tenant.http, session_id, "Time?", tool_choice={"type": "function", "name": "current_time"})
    durable = [e for e in stream if e["type"] != "assistant.delta"]
    stored = tenant.http.get(f"/v1/sessions/{session_id}/events").json()["data"]
    assert [e["id"] for e in stored] == [e["id"] for e in durable]  # deltas are streamed, not stored
    first = tenant.http.get(f"/v1/sessions/{session_id}/events", params={"limit": 2}).json()
    assert [e["id"] for e in first["data"]] == [e["id"] for e in durable[:2]] and first["has_more"] is True
    call_id = next(e["id"] for e in stream if e["type"] == "tool.call")
    after = tenant.http.get(f"/v1/sessions/{session_id}/events", params={"after": call_id}).json()["data"]
    assert [e["type"] for e in after] == ["tool.result", "assistant.message", "run.completed"]
    with tenant.http.stream(
        "GET",
        f"/v1/sessions/{session_id}/events",
        headers={"accept": "text/event-stream", "last-event-id": str(call_id)},
    ) as response:
        replayed = list(events(response))
    assert [e["type"] for e in replayed] == ["tool.result", "assistant.message", "run.completed"]
    bad = tenant.http.get(f"/v1/sessions/{session_id}/events", headers={"last-event-id": "abc"})
    assert "Last-Event-ID" in error_of(bad, 400)["message"]


def test_reconnecting_mid_run_gets_what_was_missed(tenant: TenantCtx) -> None:
    persona(tenant.http, "talker", tools=[])
    session_id = new_session(tenant.http, persona="talker")
    seen: list[dict[str, Any]] = []
    with tenant.http.stream(
        "POST",
        f"/v1/sessions/{session_id}/messages",
        json={"content": "Tell me a long story about a lighthouse.", "max_tokens": 120, "seed": 3},
    ) as response:
        for event in events(response):
            seen.append(event)
            if event["type"] == "assistant.delta" and len(seen) >= 4:
                break  # the client goes away mid-answer; the run goes on
    last = seen[-1]["id"]
    with tenant.http.stream(
        "GET",
        f"/v1/sessions/{session_id}/events",
        headers={"accept": "text/event-stream", "last-event-id": str(last)},
    ) as response:
        rest = list(events(response))
    assert rest and rest[0]["id"] > last and rest[-1]["type"] == "run.completed"
    text = "".join(e["data"]["text"] for e in seen + rest if e["type"] == "assistant.delta")
    message = next(e for e in rest if e["type"] == "assistant.message")["data"]["content"]
    assert text == message  # nothing was lost between the two connections


def test_cancel_stops_a_run_and_frees_the_session(tenant: TenantCtx) -> None:
    persona(tenant.http, "talker", tools=[])
    session_id = new_session(tenant.http, persona="talker")
    stream: list[dict[str, Any]] = []

    def follow() -> None:
        stream.extend(run(tenant.http, session_id, "Write a very long poem.", max_tokens=400, seed=1))

    reader = threading.Thread(target=follow)
    reader.start()
    deadline = time.monotonic() + 60
    run_id = None
    while run_id is None and time.monotonic() < deadline:
        run_id = tenant.http.get(f"/v1/sessions/{session_id}").json()["active_run_id"]
        time.sleep(0.05)
    assert run_id is not None
    busy = tenant.http.post(f"/v1/sessions/{session_id}/messages", json={"content": "again", **FAST})
    assert error_of(busy, 409)["code"] == "session_busy"
    cancelled = tenant.http.post(f"/v1/sessions/{session_id}/runs/{run_id}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["reason"] == "cancelled"
    reader.join(60)
    assert stream[-1]["type"] == "run.failed" and stream[-1]["data"]["reason"] == "cancelled"
    assert tenant.http.get(f"/v1/sessions/{session_id}").json()["active_run_id"] is None
    again = run(tenant.http, session_id, "Hi")
    assert again[-1]["type"] == "run.completed"
    # Cancelling a finished run answers it as it is.
    assert tenant.http.post(f"/v1/sessions/{session_id}/runs/{run_id}/cancel").json()["status"] == "cancelled"


def test_run_limits_end_the_run_with_their_reason(tenant: TenantCtx) -> None:
    persona(tenant.http, "no-tools-allowed", limits={"max_tool_calls": 0})
    session_id = new_session(tenant.http, persona="no-tools-allowed")
    stream = run(tenant.http, session_id, "Time?", tool_choice={"type": "function", "name": "current_time"})
    assert stream[-1]["type"] == "run.failed" and stream[-1]["data"]["reason"] == "max_tool_calls"
    assert "limits.max_tool_calls" in stream[-1]["data"]["message"]

    persona(tenant.http, "one-step", limits={"max_steps": 1})
    session_id = new_session(tenant.http, persona="one-step")
    stream = run(tenant.http, session_id, "Time?", tool_choice={"type": "function", "name": "current_time"})
    assert types(stream)[-3:] == ["tool.call", "tool.result", "run.failed"]
    assert stream[-1]["data"]["reason"] == "max_steps"

    persona(tenant.http, "hasty", tools=[], limits={"timeout_s": 0.3})
    session_id = new_session(tenant.http, persona="hasty")
    stream = run(tenant.http, session_id, "Write a long essay.", max_tokens=400)
    assert stream[-1]["type"] == "run.failed" and stream[-1]["data"]["reason"] == "timeout"
    # The user's message was accepted before the failure and stays in the history.
    history = tenant.http.get(f"/v1/sessions/{session_id}/history").json()["data"]
    assert history[0] == {**history[0], "role": "user", "content": "Write a long essay."}


def test_bad_tool_arguments_go_back_to_the_model(tenant: TenantCtx) -> None:
    persona(tenant.http, "clock")
    session_id = new_session(tenant.http, persona="clock")
    # Three tokens cannot hold the arguments object: the cut JSON is a tool error, and the run goes on.
    stream = run(
        tenant.http,
        session_id,
        "Time?",
        tool_choice={"type": "function", "name": "current_time"},
        max_tokens=3,
    )
    result = next(e for e in stream if e["type"] == "tool.result")["data"]
    assert result["is_error"] is True and "not valid JSON" in result["content"]
    assert stream[-1]["type"] == "run.completed"


def test_tool_choice_and_disabled_tools(tenant: TenantCtx) -> None:
    persona(tenant.http, "clock")
    session_id = new_session(tenant.http, persona="clock")
    wrong = tenant.http.post(
        f"/v1/sessions/{session_id}/messages",
        json={"content": "x", "tool_choice": {"type": "function", "name": "python"}},
    )
    assert "available: current_time" in error_of(wrong, 400)["message"]
    listed = {t["name"]: t for t in tenant.http.get("/v1/tools").json()["data"]}
    assert {"python", "http_fetch", "memory_search", "current_time"} <= set(listed)
    assert all(t["enabled"] and len(t["digest"]) == 64 and t["signature"] for t in listed.values())
    off = tenant.http.patch("/v1/tools/current_time", json={"enabled": False})
    assert off.status_code == 200 and off.json()["enabled"] is False
    refused = tenant.http.post(
        f"/v1/sessions/{session_id}/messages",
        json={"content": "x", "tool_choice": {"type": "function", "name": "current_time"}},
    )
    assert error_of(refused, 400)["param"] == "tool_choice"
    assert error_of(tenant.http.patch("/v1/tools/nope", json={"enabled": True}), 404)["param"] == "name"
    # Tenants may switch tools on and off, but not widen a tool's configuration (an SSRF allowlist).
    denied = tenant.http.patch("/v1/tools/http_fetch", json={"config": {"allowlist": ["127.0.0.1"]}})
    assert error_of(denied, 403)["param"] == "config"


def test_runs_remember_and_recall(tenant: TenantCtx) -> None:
    memory = {"recall": True, "remember": ["user"], "namespace": "persona:{persona}", "min_score": 0.3}
    persona(tenant.http, "buddy", tools=[], memory=memory)
    first = new_session(tenant.http, persona="buddy")
    stream = run(tenant.http, first, "My dog is called Biscuit and he loves the beach.")
    assert stream[-1]["type"] == "run.completed"
    remembered = stream[-1]["data"]["remembered"]
    assert len(remembered) == 1
    stored = tenant.http.get(f"/v1/memory/{remembered[0]}").json()
    assert stored["namespace"] == "persona:buddy" and stored["metadata"]["session_id"] == first
    second = new_session(tenant.http, persona="buddy")
    stream = run(tenant.http, second, "What is the name of my dog?")
    recalled = next(e for e in stream if e["type"] == "memory.recalled")["data"]
    assert recalled["namespace"] == "persona:buddy"
    assert any("Biscuit" in item["text"] for item in recalled["items"])


def test_long_history_is_trimmed_not_a_crash(tenant: TenantCtx) -> None:
    filler = "This is an old message that says very little of use. " * 10
    messages = []
    for n in range(40):
        messages += [{"role": "user", "content": f"{n}: {filler}"}, {"role": "assistant", "content": "ok"}]
    imported = tenant.http.post("/v1/sessions/import", json={"messages": messages, "persona": "talker"})
    assert imported.status_code == 201, imported.text
    session_id = imported.json()["id"]
    persona(tenant.http, "talker", tools=[])
    stream = run(tenant.http, session_id, "Hello again")
    trimmed = next(e for e in stream if e["type"] == "context.trimmed")["data"]
    assert trimmed["strategy"] == "dropped_oldest" and trimmed["dropped_messages"] > 0
    assert stream[-1]["type"] == "run.completed"


def test_export_and_import_round_trip(tenant: TenantCtx) -> None:
    persona(tenant.http, "clock")
    session_id = new_session(tenant.http, persona="clock", metadata={"ticket": "T-1"})
    run(tenant.http, session_id, "Time?", tool_choice={"type": "function", "name": "current_time"})
    exported = tenant.http.get(f"/v1/sessions/{session_id}/export").json()
    assert exported["object"] == "session.export" and exported["metadata"] == {"ticket": "T-1"}
    assert [m["role"] for m in exported["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert next(e["type"] for e in exported["events"]) == "run.started"
    copy = tenant.http.post("/v1/sessions/import", json=exported)
    assert copy.status_code == 201, copy.text
    history = tenant.http.get(f"/v1/sessions/{copy.json()['id']}/history").json()["data"]
    assert [(m["role"], m["content"]) for m in history] == [
        (m["role"], m["content"]) for m in exported["messages"]
    ]
    bad = tenant.http.post("/v1/sessions/import", json={"messages": [{"role": "wizard", "content": "x"}]})
    assert error_of(bad, 400)["param"] == "messages[0].role"


def test_sessions_and_personas_crud_and_validation(tenant: TenantCtx) -> None:
    created = persona(tenant.http, "helper", system_prompt="Be terse.", limits={"max_steps": 3})
    assert created["limits"]["max_steps"] == 3 and created["memory"]["recall"] is False
    dup = tenant.http.post("/v1/personas", json={"name": "helper"})
    assert error_of(dup, 409)["param"] == "name"
    assert error_of(tenant.http.post("/v1/personas", json={"name": "Bad Name"}), 400)["param"] == "name"
    unknown_model = tenant.http.post("/v1/personas", json={"name": "x", "model": "nope"})
    assert error_of(unknown_model, 404)["code"] == "model_not_found"
    patched = tenant.http.patch("/v1/personas/helper", json={"system_prompt": "Be kind."}).json()
    assert patched["system_prompt"] == "Be kind." and patched["limits"]["max_steps"] == 3
    assert [p["name"] for p in tenant.http.get("/v1/personas").json()["data"]] == ["helper"]
    assert error_of(tenant.http.post("/v1/sessions", json={"persona": "ghost"}), 404)["param"] == "persona"
    ids = [new_session(tenant.http, persona="helper") for _ in range(3)]
    page = tenant.http.get("/v1/sessions", params={"limit": 2}).json()
    assert [s["id"] for s in page["data"]] == ids[::-1][:2] and page["has_more"] is True
    rest = tenant.http.get("/v1/sessions", params={"limit": 2, "after": page["data"][-1]["id"]}).json()
    assert [s["id"] for s in rest["data"]] == [ids[0]] and rest["has_more"] is False
    empty = tenant.http.post(f"/v1/sessions/{ids[0]}/messages", json={"content": ""})
    assert error_of(empty, 400)["param"] == "content"
    deleted = tenant.http.delete(f"/v1/sessions/{ids[0]}")
    assert deleted.status_code == 200
    assert error_of(tenant.http.get(f"/v1/sessions/{ids[0]}"), 404)["param"] == "session_id"
    assert tenant.http.delete("/v1/personas/helper").status_code == 200
    # A session whose persona was deleted goes on with the default assistant.
    assert run(tenant.http, ids[1], "Hi")[-1]["type"] == "run.completed"


def test_another_tenant_sees_nothing(new_tenant: Callable[..., TenantCtx]) -> None:
    owner, other = new_tenant(), new_tenant()
    persona(owner.http, "private")
    session_id = new_session(owner.http, persona="private")
    stream = run(owner.http, session_id, "Hi")
    run_id = stream[0]["run_id"]
    for method, path in [
        ("GET", f"/v1/sessions/{session_id}"),
        ("GET", f"/v1/sessions/{session_id}/history"),
        ("GET", f"/v1/sessions/{session_id}/events"),
        ("GET", f"/v1/sessions/{session_id}/export"),
        ("GET", f"/v1/sessions/{session_id}/runs/{run_id}"),
        ("POST", f"/v1/sessions/{session_id}/runs/{run_id}/cancel"),
        ("DELETE", f"/v1/sessions/{session_id}"),
        ("GET", "/v1/personas/private"),
        ("DELETE", "/v1/personas/private"),
    ]:
        error_of(other.http.request(method, path), 404)
    posted = other.http.post(f"/v1/sessions/{session_id}/messages", json={"content": "hijack"})
    error_of(posted, 404)
    assert other.http.get("/v1/sessions").json()["data"] == []
    assert other.http.get("/v1/personas").json()["data"] == []
    assert error_of(other.http.post("/v1/sessions", json={"persona": "private"}), 404)["param"] == "persona"
    # The owner's session is untouched.
    assert len(owner.http.get(f"/v1/sessions/{session_id}/history").json()["data"]) == 2


def test_text_streams_token_by_token_even_with_tools_offered(tenant: TenantCtx) -> None:
    # Every built-in tool is offered (`auto`): the local model's text must still stream as it comes,
    # with only a possible `<tool_call>` opening held back.
    session_id = new_session(tenant.http)
    stream = run(tenant.http, session_id, "Write two sentences about Bob.", max_tokens=40)
    assert stream[-1]["type"] == "run.completed"
    deltas = [e for e in stream if e["type"] == "assistant.delta"]
    if not any(e["type"] == "tool.call" for e in stream):
        assert len(deltas) > 5
        message = next(e for e in stream if e["type"] == "assistant.message")["data"]["content"]
        assert "".join(d["data"]["text"] for d in deltas) == message
