"""Gates a run's tool calls pass before they run: the policy gate (action `tool.call`).

Owns: `policy_gate` and the adapters of `PolicyService` it and the two-key approval use. May import:
core, policy, tools. Never: api, db.

The chain the app factory composes: policy gate → approval gate (`tools/approvals.py`) →
`ToolRegistry.call`. A denial is not a crash: the model gets an error result naming the reasons,
and the run's log gets the whole decision (`policy.denied`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from somaagent.core.principal import Principal
from somaagent.policy.decisions import PolicyService
from somaagent.policy.evaluator import Decision, EvalRequest
from somaagent.tools.registry import ToolCaller, ToolContext, ToolOutcome, ToolStatus

# (principal, tool name, arguments JSON, context {tool, side_effect, session_id, run_id}) → decision.
PolicyEvaluate = Callable[[Principal, str, str, Mapping[str, Any]], Awaitable[Decision]]


def policy_gate(policy_evaluate: PolicyEvaluate, next_call: ToolCaller) -> ToolCaller:
    """`next_call`, reached only by calls the policy allows; a denied call comes back as `policy_denied`."""

    async def call(status: ToolStatus, context: ToolContext, arguments_json: str) -> ToolOutcome:
        started = time.perf_counter()
        manifest = status.tool.manifest
        decision = await policy_evaluate(
            context.principal,
            manifest.name,
            arguments_json,
            {
                "tool": manifest.name,
                "side_effect": manifest.side_effect,
                "session_id": context.session_id,
                "run_id": context.run_id,
            },
        )
        if decision.allowed:
            return await next_call(status, context, arguments_json)
        if context.record is not None:
            await context.record("policy.denied", decision.to_json())
        reasons = "; ".join(f"{r.message} ({r.rule})" for r in decision.reasons) or "no reason given"
        message = (
            f"the policy denies this call to {manifest.name!r} (score {decision.score:.2f}, severity "
            f"{decision.severity}): {reasons}. It did not run; do not repeat it unchanged."
        )
        return ToolOutcome(manifest.name, message, True, time.perf_counter() - started, "policy_denied")

    return call


def tool_call_policy(policy: PolicyService) -> PolicyEvaluate:
    """`PolicyService.evaluate` as the policy gate needs it: action `tool.call`, the arguments as the
    content."""

    async def evaluate(
        principal: Principal, tool: str, arguments_json: str, context: Mapping[str, Any]
    ) -> Decision:
        request = EvalRequest("tool.call", principal.subject, f"tool:{tool}", arguments_json, context)
        return await policy.evaluate(principal, request)

    return evaluate


def approver_consent(policy: PolicyService) -> Callable[[Principal, ToolStatus, str], Awaitable[Decision]]:
    """The policy's key of a two-key approval: the call, decided again when a person approves it, for the
    approver (no strike: a person asking is not an offence)."""

    async def check(approver: Principal, status: ToolStatus, arguments_json: str) -> Decision:
        manifest = status.tool.manifest
        context = {"tool": manifest.name, "side_effect": manifest.side_effect}
        request = EvalRequest("tool.call", approver.subject, f"tool:{manifest.name}", arguments_json, context)
        return await policy.evaluate(approver, request, count_strikes=False)

    return check
