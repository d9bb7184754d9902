"""Human approvals over HTTP, black box, on the real SmolLM2 model: a run's forced call to an
`external` MCP tool (the fixture server's `add`, which declares no hints) waits for a person, who lists
it, approves or rejects it through `/v1/approvals`; the run goes on either way. Who may decide, other
tenants, double decisions, the audit trail — on both backends; expiry on a server of its own with a
2-second TTL."""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import TenantCtx
from tests.support.contract import error_of
from tests.support.processes import ROOT, SomaServer, start_soma
from tests.support.sse import events

FIXTURE_SERVER = str(ROOT / "tests" / "support" / "mcp_fixture_server.py")
ADD = "mcp.calc.add"
# Room for the forced arguments ({"a": …, "b": …}) and a short answer.
FAST = {"max_tokens": 40, "temperature": 0, "seed": 7}
QUIET = {"memory": {"recall": False, "remember": []}}


def adding_session(admin: httpx.Client, tenant_name: str, http: httpx.Client) -> str:
    """A session whose agent may call the fixture server's `add` (an operator registers the server)."""
    created = admin.post(
        "/v1/mcp-servers",
        params={"tenant": tenant_name},
        json={"name": "calc", "transport": "stdio", "command": [sys.executable, FIXTURE_SERVER]},
    )
    assert created.status_code == 201, created.text
    listed = {t["name"]: t for t in http.get("/v1/tools").json()["data"]}
    assert listed[ADD]["side_effect"] == "external"  # no hints: MCP's most cautious class
    persona = http.post("/v1/personas", json={"name": "adder", "tools": [ADD], **QUIET})
    assert persona.status_code == 201, persona.text
    session = http.post("/v1/sessions", json={"persona": "adder"})
    assert session.status_code == 201, session.text
    return str(session.json()["id"])


def run_deciding(
    http: httpx.Client, session_id: str, on_approval: Callable[[dict[str, Any]], None] | None = None
) -> list[dict[str, Any]]:
    """Start a run forced to call `add`, read its stream, and act when it asks for approval."""
    body = {"content": "Add 2 and 3.", "tool_choice": {"type": "function", "name": ADD}, **FAST}
    seen: list[dict[str, Any]] = []
    with http.stream("POST", f"/v1/sessions/{session_id}/messages", json=body) as response:
        assert response.status_code == 200, response.read()
        for event in events(response):
            seen.append(event)
            if event["type"] == "approval.required" and on_approval is not None:
                on_approval(event["data"])
    return seen


def not_pending(response: httpx.Response) -> str:
    """A 409 for an approval that is no longer pending: its current status, beside the usual fields."""
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["code"] == "approval_not_pending" and error["param"] == "approval_id"
    assert f"is {error['status']} already" in error["message"]
    return str(error["status"])


def types(stream: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in stream if e["type"] != "assistant.delta"]


def of_type(stream: list[dict[str, Any]], type_: str) -> dict[str, Any]:
    return dict(next(e for e in stream if e["type"] == type_)["data"])


def key_client(server: SomaServer, admin: httpx.Client, tenant: TenantCtx, role: str) -> httpx.Client:
    created = admin.post("/v1/keys", json={"tenant": tenant.name, "name": role, "role": role})
    assert created.status_code == 201, created.text
    headers = {"authorization": f"Bearer {created.json()['key']}"}
    return httpx.Client(base_url=server.base_url, headers=headers, timeout=60)


def audit_of(http: httpx.Client, approval_id: str, count: int) -> list[dict[str, Any]]:
    """The tenant's audit events about one approval, once `count` of them are there."""
    deadline = time.monotonic() + 10
    found: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        rows = http.get("/v1/audit", params={"type": "approval.", "limit": 200}).json()["data"]
        found = [r for r in rows if r["data"]["approval_id"] == approval_id]
        if len(found) >= count:
            return found
        time.sleep(0.1)
    raise AssertionError(f"expected {count} audit events about {approval_id}, found {found}")


FLOW = [
    "run.started",
    "tool.call",
    "approval.required",
    "approval.decided",
    "tool.result",
    "assistant.message",
    "run.completed",
]


def test_an_approved_call_runs_and_the_run_completes(
    server: SomaServer, admin: httpx.Client, new_tenant: Callable[..., TenantCtx]
) -> None:
    tenant, other = new_tenant(), new_tenant()
    session_id = adding_session(admin, tenant.name, tenant.http)
    viewer = key_client(server, admin, tenant, "viewer")
    checked: dict[str, Any] = {}

    def approve(required: dict[str, Any]) -> None:
        approval_id = required["approval_id"]
        listed = tenant.http.get("/v1/approvals", params={"status": "pending", "session_id": session_id})
        assert listed.status_code == 200, listed.text
        (pending,) = listed.json()["data"]
        assert pending["id"] == approval_id and pending["status"] == "pending"
        assert pending["tool"] == ADD and pending["arguments"] == required["args"]
        assert pending["side_effect"] == "external" and pending["requested_by"] == f"key:{tenant.key_id}"
        assert pending["reason"] == required["reason"] and "approvals.side_effects" in pending["reason"]
        assert tenant.http.get(f"/v1/approvals/{approval_id}").json() == pending

        # A viewer holds no tools:approve; another tenant does not see it at all.
        for response in (
            viewer.get("/v1/approvals"),
            viewer.post(f"/v1/approvals/{approval_id}", json={"decision": "approve"}),
        ):
            assert error_of(response, 403)["code"] == "missing_capability"
        assert error_of(other.http.get(f"/v1/approvals/{approval_id}"), 404)["param"] == "approval_id"
        stolen = other.http.post(f"/v1/approvals/{approval_id}", json={"decision": "approve"})
        assert error_of(stolen, 404)["param"] == "approval_id"
        assert other.http.get("/v1/approvals").json()["data"] == []
        bad = tenant.http.post(f"/v1/approvals/{approval_id}", json={"decision": "maybe"})
        assert error_of(bad, 400)["param"] == "decision"

        decided = tenant.http.post(f"/v1/approvals/{approval_id}", json={"decision": "approve", "note": "ok"})
        assert decided.status_code == 200, decided.text
        assert (
            decided.json()["status"] == "approved" and decided.json()["decided_by"] == f"key:{tenant.key_id}"
        )
        twice = tenant.http.post(f"/v1/approvals/{approval_id}", json={"decision": "reject"})
        assert not_pending(twice) == "approved"
        checked["id"] = approval_id

    try:
        stream = run_deciding(tenant.http, session_id, approve)
    finally:
        viewer.close()
    assert types(stream) == FLOW
    required, decided = of_type(stream, "approval.required"), of_type(stream, "approval.decided")
    assert required["approval_id"] == checked["id"] and required["tool"] == ADD
    assert required["two_key"] is False and "side effect 'external'" in required["reason"]
    assert decided == {
        "approval_id": checked["id"],
        "decision": "approved",
        "decided_by": f"key:{tenant.key_id}",
        "note": "ok",
    }
    result = of_type(stream, "tool.result")
    assert result["is_error"] is False, result
    args = required["args"]
    assert result["content"] == str(args["a"] + args["b"])  # the real server added them

    approved = tenant.http.get("/v1/approvals", params={"status": "approved"}).json()["data"]
    assert [a["id"] for a in approved] == [checked["id"]]
    assert tenant.http.get("/v1/approvals", params={"status": "pending"}).json()["data"] == []
    trail = audit_of(tenant.http, checked["id"], 2)
    assert [(r["type"], r["actor"]) for r in trail] == [
        ("approval.requested", f"key:{tenant.key_id}"),
        ("approval.approved", f"key:{tenant.key_id}"),
    ]
    assert all(r["tenant_id"] == tenant.id for r in trail)


def test_a_rejected_call_is_an_error_the_model_sees(admin: httpx.Client, tenant: TenantCtx) -> None:
    session_id = adding_session(admin, tenant.name, tenant.http)

    def reject(required: dict[str, Any]) -> None:
        decided = tenant.http.post(
            f"/v1/approvals/{required['approval_id']}",
            json={"decision": "reject", "note": "use the finance calculator instead"},
        )
        assert decided.status_code == 200 and decided.json()["status"] == "rejected", decided.text

    stream = run_deciding(tenant.http, session_id, reject)
    assert types(stream) == FLOW
    assert of_type(stream, "approval.decided")["decision"] == "rejected"
    result = of_type(stream, "tool.result")
    assert result["is_error"] is True and result["error_code"] == "approval_rejected"
    assert "use the finance calculator instead" in result["content"]
    history = tenant.http.get(f"/v1/sessions/{session_id}/history").json()["data"]
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant"]
    approval_id = of_type(stream, "approval.required")["approval_id"]
    assert [r["type"] for r in audit_of(tenant.http, approval_id, 2)] == [
        "approval.requested",
        "approval.rejected",
    ]


@pytest.fixture(scope="module")
def hasty() -> Iterator[SomaServer]:
    """A server whose approvals expire after 2 s (SQLite)."""
    soma = start_soma(None, {"SOMA_APPROVAL_TTL_S": "2"})
    try:
        yield soma
    finally:
        soma.stop()


def test_an_undecided_call_expires_and_the_run_goes_on(hasty: SomaServer) -> None:
    with httpx.Client(
        base_url=hasty.base_url, headers={"authorization": f"Bearer {hasty.admin_key}"}, timeout=120
    ) as operator:
        name = "hasty"
        assert operator.post("/v1/tenants", json={"name": name}).status_code == 201
        key = operator.post("/v1/keys", json={"tenant": name, "name": "owner", "role": "owner"}).json()
        with httpx.Client(
            base_url=hasty.base_url, headers={"authorization": f"Bearer {key['key']}"}, timeout=120
        ) as http:
            session_id = adding_session(operator, name, http)
            started = time.monotonic()
            stream = run_deciding(http, session_id)
            assert types(stream) == FLOW
            assert time.monotonic() - started >= 2
            decided = of_type(stream, "approval.decided")
            assert decided["decision"] == "expired" and decided["decided_by"] == "system"
            result = of_type(stream, "tool.result")
            assert result["is_error"] is True and result["error_code"] == "approval_expired"
            approval_id = of_type(stream, "approval.required")["approval_id"]
            late = http.post(f"/v1/approvals/{approval_id}", json={"decision": "approve"})
            assert not_pending(late) == "expired"
            assert http.get(f"/v1/approvals/{approval_id}").json()["status"] == "expired"
            assert [r["type"] for r in audit_of(http, approval_id, 2)] == [
                "approval.requested",
                "approval.expired",
            ]


def signed_in(server: SomaServer, tenant: TenantCtx, role: str) -> httpx.Client:
    """A person of the tenant with `role`, signed in (an access token, not an API key)."""
    username, password = f"p-{secrets.token_hex(4)}@example.com", "a long enough password"
    made = tenant.http.post("/v1/users", json={"username": username, "role": role, "password": password})
    assert made.status_code == 201, made.text
    form = {"grant_type": "password", "tenant": tenant.name, "username": username, "password": password}
    token = httpx.post(f"{server.v1}/auth/token", data=form, timeout=30)
    assert token.status_code == 200, token.text
    headers = {"authorization": f"Bearer {token.json()['access_token']}"}
    return httpx.Client(base_url=server.base_url, headers=headers, timeout=60)


def test_two_key_tools_need_another_person_and_the_policy(
    server: SomaServer, admin: httpx.Client, tenant: TenantCtx
) -> None:
    session_id = adding_session(admin, tenant.name, tenant.http)
    policy = {"approvals": {"tools": {ADD: "two_key"}}}
    assert tenant.http.put("/v1/policy", json={"document": policy}).status_code == 200
    other_key = key_client(server, admin, tenant, "admin")
    person = signed_in(server, tenant, "admin")
    outcomes: list[tuple[int, str | None]] = []

    def decide(required: dict[str, Any]) -> None:
        assert required["two_key"] is True
        url = f"/v1/approvals/{required['approval_id']}"
        for who in (tenant.http, other_key, person):  # the caller itself, another key, a person
            answer = who.post(url, json={"decision": "approve", "note": "checked"})
            outcomes.append((answer.status_code, answer.json().get("error", {}).get("code")))
            if answer.status_code == 200:
                break

    stream = run_deciding(tenant.http, session_id, decide)
    assert outcomes == [(403, "four_eyes_required"), (403, "four_eyes_required"), (200, None)]
    assert of_type(stream, "approval.decided")["decided_by"].startswith("user:")
    assert of_type(stream, "tool.result")["is_error"] is False
    other_key.close()
    person.close()


def test_the_policy_gate_denies_a_tool_call_before_anyone_is_asked(
    admin: httpx.Client, tenant: TenantCtx
) -> None:
    session_id = adding_session(admin, tenant.name, tenant.http)
    policy = {
        "rules": [
            {"id": "no-external", "kind": "side_effect", "classes": ["external"], "actions": ["tool.call"]}
        ]
    }
    assert tenant.http.put("/v1/policy", json={"document": policy}).status_code == 200
    stream = run_deciding(tenant.http, session_id)
    assert "approval.required" not in types(stream)
    denied = of_type(stream, "policy.denied")
    assert denied["allowed"] is False and denied["reasons"][0]["rule"] == "no-external"
    result = of_type(stream, "tool.result")
    assert result["is_error"] is True and result["error_code"] == "policy_denied"
    assert stream[-1]["type"] == "run.completed"  # the model saw the refusal; the run went on
    assert tenant.http.get("/v1/approvals", params={"status": "pending"}).json()["data"] == []


def test_a_direct_invoke_of_a_tool_that_needs_a_person_is_refused(
    admin: httpx.Client, tenant: TenantCtx
) -> None:
    adding_session(admin, tenant.name, tenant.http)
    invoked = tenant.http.post(f"/v1/tools/{ADD}/invoke", json={"arguments": {"a": 2, "b": 3}})
    assert invoked.status_code == 200, invoked.text
    assert invoked.json()["is_error"] is True and invoked.json()["error_code"] == "approval_required"
