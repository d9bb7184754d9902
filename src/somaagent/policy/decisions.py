"""`PolicyService`: the one evaluator every enforcement point calls, with fail-closed, events and strikes.

Owns: compiling each tenant's constitution + policy (cached), deciding, emitting `policy.decisions`,
counting moderation strikes, and the output guard that checks model text while it streams.
May import: core, db, events, policy. Never: api, agents, models.

Every decision emits one `policy.decisions` event naming exactly what was scanned: the action, the
subject, the resource, how many characters, and a keyed digest (HMAC-SHA256) of the text; the text
itself stays where it was written: events are fanned out widely and the text may be the very PII a rule
found.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.core.clock import utcnow
from somaagent.core.errors import PolicyDenied
from somaagent.core.principal import Principal
from somaagent.events.outbox import BufferedEmitter
from somaagent.events.schemas import POLICY_DECISIONS, Event
from somaagent.policy.constitution import ConstitutionInvalid, Constitutions
from somaagent.policy.document import ApprovalSettings, PolicyDocument
from somaagent.policy.evaluator import CompiledPolicy, Decision, EvalRequest, Reason
from somaagent.policy.policies import get_policy
from somaagent.policy.stream_guard import StreamGuard
from somaagent.policy.strikes import Strikes

log = logging.getLogger(__name__)

# The hash and version named by a decision made without the tenant's policy (it could not be loaded).
_UNKNOWN = "unknown"
# Content longer than this is evaluated in a worker thread, so a large body does not stall other requests.
OFF_LOOP_CHARS = 64 * 1024


@dataclass
class _Cached:
    checked_at: float
    policy: CompiledPolicy


class PolicyService:
    """Decides for every enforcement point: input, tool calls, memory writes and streamed output."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        constitutions: Constitutions,
        strikes: Strikes,
        emitter: BufferedEmitter,
        ttl_s: float,
        digest_key: bytes,
    ) -> None:
        self._sessions = sessions
        # Keys the digest of scanned text in decision events: a plain SHA-256 of a short card number or
        # an argument could be found again by trying every value.
        self._digest_key = digest_key
        self._constitutions = constitutions
        self.strikes = strikes
        self._emitter = emitter
        self._ttl_s = ttl_s
        self._cache: dict[str, _Cached] = {}

    # --- the compiled policy --------------------------------------------------------------------

    async def compiled(self, tenant_id: str) -> CompiledPolicy:
        """The tenant's constitution and policy, compiled; re-read at most every `ttl_s`."""
        cached = self._cache.get(tenant_id)
        now = time.monotonic()
        if cached is not None and now - cached.checked_at < self._ttl_s:
            return cached.policy
        constitution = await self._constitutions.active(tenant_id)
        async with self._sessions() as session:
            stored = await get_policy(session, tenant_id)
        policy = cached.policy if cached is not None else None
        if (
            policy is None
            or policy.policy_version != stored.version
            or policy.constitution_hash != constitution.sha256
        ):
            policy = CompiledPolicy.compile(
                constitution.rules, stored.document, constitution.sha256, stored.version
            )
        self._cache[tenant_id] = _Cached(now, policy)
        return policy

    def forget(self, tenant_id: str) -> None:
        """Drop this process's copy after a change, so the next decision reads the new version."""
        self._cache.pop(tenant_id, None)

    async def document(self, tenant_id: str) -> PolicyDocument:
        """The tenant's policy document in force."""
        return (await self.compiled(tenant_id)).document

    async def approval_settings(self, tenant_id: str) -> ApprovalSettings:
        """Which tool calls of the tenant need a human."""
        return (await self.document(tenant_id)).approvals

    # --- deciding -------------------------------------------------------------------------------

    async def evaluate(
        self, principal: Principal, request: EvalRequest, *, count_strikes: bool = True
    ) -> Decision:
        """Decide `request` for the principal's tenant; never raises. A policy that cannot be evaluated
        denies unless the tenant's policy fails open; a constitution that fails verification always denies.
        A request about the caller itself gets the caller's capabilities in its context."""
        tenant_id = principal.tenant_id
        if request.subject == principal.subject and "capabilities" not in request.context:
            request = replace(
                request, context={**request.context, "capabilities": sorted(principal.capabilities)}
            )
        locked = None
        policy: CompiledPolicy | None = None
        try:
            locked = await self.strikes.locked_until(tenant_id, request.subject)
            if locked is not None:
                decision = await self._locked_decision(tenant_id, request.subject, locked)
            else:
                policy = await self.compiled(tenant_id)
                if len(request.content or "") > OFF_LOOP_CHARS:  # ~0.15 s per MB: not on the event loop
                    decision = await asyncio.to_thread(policy.evaluate, request)
                else:
                    decision = policy.evaluate(request)
        except ConstitutionInvalid as exc:  # the platform's rules cannot be trusted: no tenant opts out
            log.error("tenant %s: %s; denying %s", tenant_id, exc.message, request.action)
            decision = self._failed_decision(tenant_id, always_closed=True)
        except Exception:
            log.exception("policy evaluation failed for tenant %s (action %s)", tenant_id, request.action)
            decision = self._failed_decision(tenant_id)
        scanned = request.content or ""
        self._emit(
            principal, request.action, request.subject, request.resource, scanned, len(scanned), decision
        )
        if not decision.allowed and count_strikes and locked is None and policy is not None:
            await self._strike(tenant_id, request.subject, policy.document)
        return decision

    async def require(self, principal: Principal, request: EvalRequest) -> Decision:
        """`evaluate`, raising `PolicyDenied` (with the decision in the error body) when it denies."""
        decision = await self.evaluate(principal, request)
        if not decision.allowed:
            raise denied(decision, request.action)
        return decision

    async def output_guard(self, principal: Principal, context: Mapping[str, Any]) -> OutputGuard:
        """A guard for one stream of model output (action `model.output`)."""
        tenant_id = principal.tenant_id
        try:
            policy = await self.compiled(tenant_id)
        except Exception as exc:
            log.exception("policy could not be loaded for tenant %s's output", tenant_id)
            decision = self._failed_decision(tenant_id, always_closed=isinstance(exc, ConstitutionInvalid))
            if not decision.allowed:
                self._emit(principal, "model.output", principal.subject, None, "", 0, decision)
                raise denied(decision, "model.output") from None
            return OutputGuard(self, principal, None, context)
        return OutputGuard(self, principal, policy, context)

    # --- internals ------------------------------------------------------------------------------

    async def _locked_decision(self, tenant_id: str, subject: str, until: datetime) -> Decision:
        seconds = max(1, int((until - utcnow()).total_seconds()))
        cached = self._cache.get(tenant_id)
        return Decision(
            allowed=False,
            score=1.0,
            severity="high",
            reasons=(
                Reason(
                    "moderation_locked",
                    "moderation",
                    f"{subject} is locked out after repeated policy denials until {until.isoformat()} "
                    f"(in {seconds} s); an admin can lift it with DELETE /v1/policy/strikes/{{subject}}",
                ),
            ),
            constitution_hash=cached.policy.constitution_hash if cached else _UNKNOWN,
            policy_version=cached.policy.policy_version if cached else -1,
        )

    def _failed_decision(self, tenant_id: str, always_closed: bool = False) -> Decision:
        cached = self._cache.get(tenant_id)
        # The last fail mode this process knew for the tenant; none known: closed.
        fail_closed = always_closed or (cached.policy.document.fail_closed if cached is not None else True)
        mode = "closed (denied)" if fail_closed else "open (allowed)"
        return Decision(
            allowed=not fail_closed,
            score=1.0 if fail_closed else 0.0,
            severity="high" if fail_closed else "none",
            reasons=(
                Reason(
                    "evaluation_error",
                    "policy",
                    f"the policy could not be evaluated; the tenant's policy fails {mode}",
                ),
            ),
            constitution_hash=cached.policy.constitution_hash if cached else _UNKNOWN,
            policy_version=cached.policy.policy_version if cached else -1,
        )

    async def _strike(self, tenant_id: str, subject: str, document: PolicyDocument) -> None:
        if not document.moderation.enabled:
            return
        try:
            await self.strikes.count_denial(tenant_id, subject, document.moderation)
        except Exception:  # the denial stands even if it could not be counted
            log.exception("could not count a strike for %s", subject)

    def _emit(
        self,
        principal: Principal,
        action: str,
        subject: str,
        resource: str | None,
        scanned: str,
        scanned_chars: int,
        decision: Decision,
    ) -> None:
        self._emitter.emit(
            Event(
                topic=POLICY_DECISIONS,
                type="policy.decision",
                tenant_id=principal.tenant_id,
                actor=principal.subject,
                data={
                    "action": action,
                    "subject": subject,
                    "resource": resource,
                    "scanned": {
                        "chars": scanned_chars,
                        "hmac_sha256": hmac.new(
                            self._digest_key, scanned.encode(), hashlib.sha256
                        ).hexdigest(),
                    },
                    **decision.to_json(),
                },
            )
        )


class OutputGuard:
    """Checks one stream of model output: `feed` returns the text that may be shown now, `finish` the
    held tail. A denial raises `PolicyDenied`, emits the decision and counts a strike; nothing of the
    denied window was released."""

    def __init__(
        self,
        service: PolicyService,
        principal: Principal,
        policy: CompiledPolicy | None,
        context: Mapping[str, Any],
    ) -> None:
        self._service = service
        self._principal = principal
        self._policy = policy
        self._guard = StreamGuard(policy, principal.subject, context) if policy is not None else None
        self._text: list[str] = []
        self._done = False

    async def feed(self, text: str) -> str:
        """The part of the output so far that is checked and may be shown."""
        if self._guard is None:
            return text
        self._text.append(text)
        step = self._guard.feed(text)
        if step.denied is not None:
            await self._deny(step.denied)
        return step.release

    async def finish(self) -> str:
        """The held tail once the stream has ended (checked), and the decision event."""
        if self._guard is None or self._done:
            return ""
        self._done = True
        step = self._guard.finish()
        if step.denied is not None:
            await self._deny(step.denied)
        self._emit(step_decision_allowed(self._policy))
        return step.release

    async def _deny(self, decision: Decision) -> None:
        self._done = True
        self._emit(decision)
        assert self._policy is not None
        await self._service._strike(self._principal.tenant_id, self._principal.subject, self._policy.document)
        raise denied(decision, "model.output")

    def _emit(self, decision: Decision) -> None:
        assert self._guard is not None
        scanned = "".join(self._text)[: self._guard.scanned_chars]
        self._service._emit(
            self._principal,
            "model.output",
            self._principal.subject,
            None,
            scanned,
            self._guard.scanned_chars,
            decision,
        )


def step_decision_allowed(policy: CompiledPolicy | None) -> Decision:
    """The decision of an output stream that passed every check."""
    return Decision(
        allowed=True,
        score=0.0,
        severity="none",
        reasons=(),
        constitution_hash=policy.constitution_hash if policy else _UNKNOWN,
        policy_version=policy.policy_version if policy else -1,
    )


def denied(decision: Decision, action: str) -> PolicyDenied:
    """The error for a denial: the message gives the first reasons, the body carries the decision."""
    first = "; ".join(f"{r.rule}: {r.message}" for r in decision.reasons[:3]) or "denied by policy"
    code = (
        decision.reasons[0].code
        if decision.reasons and decision.reasons[0].code == "moderation_locked"
        else None
    )
    error = PolicyDenied(f"{action} denied by policy (score {decision.score:.2f}): {first}", code=code)
    error.extra["decision"] = decision.to_json()
    return error


def policy_screen(policy: PolicyService) -> Callable[[Principal, str, str], Awaitable[None]]:
    """The check before a memory write (`memory.write`), for the memory service."""

    async def screen(principal: Principal, text: str, namespace: str) -> None:
        await policy.require(
            principal, EvalRequest("memory.write", principal.subject, f"memory:{namespace}", text, {})
        )

    return screen
