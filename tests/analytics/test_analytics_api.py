"""Analytics over HTTP on the real server (SQLite and PostgreSQL): a real chat completion and a real
agent run (with a tool call) reach the dashboard and the rollups; operators read any tenant with
`?tenant=`, anyone else gets 404 for another tenant; bad parameters are 400s naming the parameter."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from tests.conftest import TenantCtx
from tests.support.contract import error_of
from tests.support.sse import events

CHAT = "smollm2-135m-instruct"
FAST = {"max_tokens": 16, "temperature": 0, "seed": 7}


def dashboard_when(
    http: httpx.Client, ready: Callable[[dict[str, Any]], bool], timeout: float = 20, **params: Any
) -> dict[str, Any]:
    """Poll the dashboard until `ready` holds: events reach the rollups through the outbox and the bus."""
    deadline = time.monotonic() + timeout
    while True:
        response = http.get("/v1/analytics/dashboard", params=params)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        if ready(body):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"the dashboard did not catch up in {timeout}s: {body}")
        time.sleep(0.2)


def agent_run(http: httpx.Client) -> dict[str, Any]:
    """A real run of a persona that must call `current_time`; returns its `run.completed` event."""
    made = http.post(
        "/v1/personas",
        json={"name": "clock", "tools": ["current_time"], "memory": {"recall": False, "remember": []}},
    )
    assert made.status_code == 201, made.text
    session = http.post("/v1/sessions", json={"persona": "clock"})
    assert session.status_code == 201, session.text
    body = {
        "content": "What time is it in Paris?",
        "tool_choice": {"type": "function", "name": "current_time"},
        **FAST,
    }
    with http.stream("POST", f"/v1/sessions/{session.json()['id']}/messages", json=body) as response:
        assert response.status_code == 200, response.read()
        stream = list(events(response))
    assert stream[-1]["type"] == "run.completed", stream[-1]
    return stream[-1]


def test_a_real_chat_call_and_agent_run_show_on_the_dashboard(tenant: TenantCtx, admin: httpx.Client) -> None:
    completion = tenant.oai.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "Say hi."}], **FAST
    )
    assert completion.usage is not None
    done = agent_run(tenant.http)
    run_tokens = done["data"]["usage"]["prompt_tokens"] + done["data"]["usage"]["completion_tokens"]

    body = dashboard_when(
        tenant.http,
        lambda b: b["live"]["today"]["runs"] >= 1 and b["live"]["today"]["requests"] >= 3,
    )
    assert body["object"] == "analytics.dashboard" and body["tenant_id"] == tenant.id
    today, recent = body["live"]["today"], body["live"]["last_5_minutes"]
    # The chat call plus the run's two model calls (the forced tool call, then the answer).
    assert today["requests"] == recent["requests"] == 3
    assert today["tokens"] == completion.usage.total_tokens + run_tokens
    assert today["runs"] == recent["runs"] == 1
    assert today["tool_calls"] == recent["tool_calls"] == 1
    assert today["policy_decisions"] >= 1  # the run's input was screened
    assert body["error_rate"] == {"last_hour": 0.0, "today": 0.0}
    for window in ("last_hour", "today"):
        latency = body["latency"][window]
        assert latency["p50_ms"] is not None and 0 < latency["p50_ms"] <= latency["p95_ms"]
    [model] = body["top"]["models"]
    assert model["name"] == CHAT and model["count"] == 3 and model["errors"] == 0
    assert [(p["name"], p["count"]) for p in body["top"]["personas"]] == [("clock", 1)]
    assert [(t["name"], t["count"]) for t in body["top"]["tools"]] == [("current_time", 1)]
    spend = body["spend"]
    assert (
        spend["today_usd"] == f"{spend['today_micros'] // 1_000_000}.{spend['today_micros'] % 1_000_000:06d}"
    )
    assert spend["budgets"] == [] and body["anomalies"] == []

    # The charts agree with the dashboard.
    runs = tenant.http.get("/v1/analytics/rollups", params={"kind": "run", "group_by": "persona,model"})
    assert runs.status_code == 200, runs.text
    [row] = runs.json()["data"]
    assert row["group"] == {"persona": "clock", "model": CHAT}
    assert (row["count"], row["errors"], row["prompt_tokens"] + row["completion_tokens"]) == (
        1,
        0,
        run_tokens,
    )
    assert row["p50_ms"] is not None
    models = tenant.http.get(
        "/v1/analytics/rollups", params={"kind": "model", "group_by": "day,model"}
    ).json()
    assert [(r["group"]["model"], r["count"]) for r in models["data"]] == [(CHAT, 3)]
    hourly = tenant.http.get("/v1/analytics/rollups", params={"kind": "tool", "group_by": "hour,tool"}).json()
    [tool_row] = hourly["data"]
    assert tool_row["group"]["tool"] == "current_time" and tool_row["group"]["hour"].endswith(":00:00Z")
    assert tenant.http.get("/v1/analytics/anomalies").json() == {"object": "list", "data": []}

    # An operator reads the same dashboard by naming the tenant.
    seen = admin.get("/v1/analytics/dashboard", params={"tenant": tenant.name})
    assert seen.status_code == 200 and seen.json()["live"]["today"]["runs"] == 1


def test_a_budget_shows_against_spend(tenant: TenantCtx) -> None:
    made = tenant.http.post(
        "/v1/budgets", json={"scope": "tenant", "unit": "usd", "limit": 5_000_000, "period": "day"}
    )
    assert made.status_code == 201, made.text
    [budget] = tenant.http.get("/v1/analytics/dashboard").json()["spend"]["budgets"]
    assert budget["id"] == made.json()["id"] and budget["unit"] == "usd" and budget["limit"] == 5_000_000
    assert budget["spent"] == 0 and budget["remaining"] == 5_000_000 and budget["used"] == 0


def test_another_tenants_analytics_do_not_exist(new_tenant: Callable[..., TenantCtx]) -> None:
    mine, theirs = new_tenant(), new_tenant()
    for path, params in (
        ("/v1/analytics/dashboard", {}),
        ("/v1/analytics/rollups", {"kind": "model"}),
        ("/v1/analytics/anomalies", {}),
    ):
        for ref in (theirs.name, theirs.id):
            error = error_of(mine.http.get(path, params={**params, "tenant": ref}), 404)
            assert error["param"] == "tenant"
        assert mine.http.get(path, params={**params, "tenant": mine.name}).status_code == 200


def test_bad_parameters_are_400s_naming_them(tenant: TenantCtx) -> None:
    cases = [
        ("/v1/analytics/rollups", {}, "kind"),
        ("/v1/analytics/rollups", {"kind": "spend"}, "kind"),
        ("/v1/analytics/rollups", {"kind": "model", "group_by": "persona"}, "group_by"),
        ("/v1/analytics/rollups", {"kind": "run", "group_by": "hour,day"}, "group_by"),
        ("/v1/analytics/rollups", {"kind": "tool", "group_by": "tool,tool"}, "group_by"),
        ("/v1/analytics/rollups", {"kind": "model", "since": "yesterday"}, "since"),
        ("/v1/analytics/rollups", {"kind": "model", "since": "2026-01-01T00:00:00"}, "since"),
        ("/v1/analytics/rollups", {"kind": "model", "since": "2026-02-01", "until": "2026-01-01"}, "until"),
        ("/v1/analytics/rollups", {"kind": "model", "since": "2025-01-01", "until": "2026-01-01"}, "since"),
        ("/v1/analytics/rollups", {"kind": "model", "until": "0001-01-01"}, "until"),  # no default window
        ("/v1/analytics/rollups", {"kind": "model", "since": "9999-12-31T23:59:59Z"}, "since"),
        ("/v1/analytics/anomalies", {"metric": "cost"}, "metric"),
        ("/v1/analytics/anomalies", {"limit": 0}, "limit"),
        ("/v1/analytics/anomalies", {"limit": "many"}, "limit"),
    ]
    for path, params, param in cases:
        error = error_of(tenant.http.get(path, params=params), 400)
        assert error["param"] == param, (params, error)
