"""The policy gate with a real compiled policy, real built-in tools and a real run recorder (SQLite and
PostgreSQL): denied calls never run and come back as `policy_denied` with the reasons, the whole
decision lands in the run's log, allowed calls pass through — and a denied call asks no person."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.agents.event_log import read_events
from somaagent.agents.tool_gates import PolicyEvaluate, policy_gate
from somaagent.core.principal import Principal
from somaagent.identity.capabilities import ROLE_CAPABILITIES
from somaagent.policy.document import ApprovalSettings, PolicyDocument, parse_rules
from somaagent.policy.evaluator import CompiledPolicy, Decision, EvalRequest
from somaagent.tools.approval_rules import ApprovalRules
from somaagent.tools.approvals import ApprovalGate
from tests.support.runs import builtins, run_context

PRINCIPAL = Principal("ten_gates", "gates", "key:member", "member", ROLE_CAPABILITIES["member"])
RULES = parse_rules(
    [
        {
            "id": "no-tokyo",
            "kind": "regex",
            "actions": ["tool.call"],
            "pattern": r"Tokyo",
            "severity": "high",
            "message": "Tokyo is off limits",
        },
        {"id": "no-outside", "kind": "side_effect", "actions": ["tool.call"], "classes": ["external"]},
    ]
)
POLICY = CompiledPolicy.compile([], PolicyDocument(rules=RULES), "d" * 64, 3)


def evaluate_with(policy: CompiledPolicy) -> PolicyEvaluate:
    """How the app factory adapts `PolicyService.evaluate`, here over one compiled policy."""

    async def evaluate(
        principal: Principal, tool: str, arguments_json: str, context: Mapping[str, Any]
    ) -> Decision:
        known = {**context, "capabilities": sorted(principal.capabilities)}
        return policy.evaluate(EvalRequest("tool.call", principal.subject, tool, arguments_json, known))

    return evaluate


async def test_a_denied_call_does_not_run_and_the_run_log_has_the_decision(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    registry, tools = builtins()
    gated = policy_gate(evaluate_with(POLICY), registry.call)
    context, recorder = await run_context(sessions, PRINCIPAL)

    outcome = await gated(tools["current_time"], context, '{"timezone": "Asia/Tokyo"}')
    assert outcome.is_error and outcome.error_code == "policy_denied"
    assert "Tokyo is off limits (no-tokyo)" in outcome.content and "severity high" in outcome.content
    assert "datetime" not in outcome.content  # the clock never ran

    async with sessions() as db:
        logged = await read_events(db, PRINCIPAL.tenant_id, recorder.session_id, 0)
    (denied,) = logged
    expected = POLICY.evaluate(
        EvalRequest(
            "tool.call",
            PRINCIPAL.subject,
            "current_time",
            '{"timezone": "Asia/Tokyo"}',
            {
                "tool": "current_time",
                "side_effect": "read",
                "session_id": recorder.session_id,
                "run_id": recorder.run_id,
                "capabilities": sorted(PRINCIPAL.capabilities),
            },
        )
    )
    assert denied.type == "policy.denied" and denied.data == json.loads(json.dumps(expected.to_json()))
    assert denied.data["allowed"] is False and denied.data["policy_version"] == 3

    # The side-effect class is in the context: every external call is denied, whatever its arguments.
    fetched = await gated(tools["http_fetch"], context, '{"url": "https://example.com/"}')
    assert fetched.error_code == "policy_denied" and "no-outside" in fetched.content


async def test_an_allowed_call_passes_through(sessions: async_sessionmaker[AsyncSession]) -> None:
    registry, tools = builtins()
    gated = policy_gate(evaluate_with(POLICY), registry.call)
    context, recorder = await run_context(sessions, PRINCIPAL)
    outcome = await gated(tools["current_time"], context, '{"timezone": "Europe/Paris"}')
    assert not outcome.is_error and json.loads(outcome.content)["timezone"] == "Europe/Paris"
    async with sessions() as db:
        assert await read_events(db, PRINCIPAL.tenant_id, recorder.session_id, 0) == []


async def test_the_policy_decides_before_anyone_is_asked(sessions: async_sessionmaker[AsyncSession]) -> None:
    registry, tools = builtins()

    async def every_call_waits(_tenant_id: str) -> ApprovalRules:
        return ApprovalSettings(side_effects=["read", "write", "external"])

    approvals = ApprovalGate(sessions, every_call_waits, ttl_s=60)
    chain = policy_gate(evaluate_with(POLICY), approvals.wrap(registry.call))  # as the app composes it
    context, _ = await run_context(sessions, PRINCIPAL)
    outcome = await chain(tools["current_time"], context, '{"timezone": "Asia/Tokyo"}')
    assert outcome.error_code == "policy_denied"
    assert await approvals.list_approvals(PRINCIPAL, None, None, 10, None) == []
