"""`/v1/policy`: decisions (`POST /v1/policy/evaluate`), the tenant's versioned policy and its rules, and
moderation strikes. Changing anything needs `policy:admin`; asking for a decision about yourself needs
only `chat:use` (about someone else, `policy:admin`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field

from somaagent.api.deps import ChatUseDep, PolicyAdminDep, ServicesDep, SessionDep
from somaagent.api.openai.docs import error_responses
from somaagent.core.errors import Forbidden, NotFound
from somaagent.core.pagination import ListOut
from somaagent.identity.capabilities import Capability
from somaagent.policy.document import PolicyDocument, Rule
from somaagent.policy.evaluator import EvalRequest
from somaagent.policy.policies import (
    StoredPolicy,
    delete_rule,
    get_policy,
    list_versions,
    put_policy,
    put_rule,
)
from somaagent.policy.strikes import StrikeState

router = APIRouter(prefix="/v1/policy", tags=["Governance"])


class EvaluateIn(BaseModel):
    """What to decide: who does what to which resource, with what content."""

    model_config = ConfigDict(extra="forbid")

    action: str = Field(min_length=1, max_length=64, examples=["tool.call", "chat.input", "publish"])
    subject: str | None = Field(
        default=None,
        max_length=255,
        description="Whom the decision is about; default: the caller. Another subject needs policy:admin.",
    )
    resource: str | None = Field(default=None, max_length=1000, examples=["tool:http_fetch"])
    content: str | None = Field(
        default=None, max_length=1_000_000, description="Text the content rules scan."
    )
    context: dict[str, Any] = Field(
        default_factory=dict,
        description="Facts rules look at: `model`, `tool`, `side_effect`, `capabilities` (default: the "
        "caller's when the subject is the caller).",
    )
    dry_run: bool = Field(default=False, description="Decide without counting a moderation strike.")


class ReasonOut(BaseModel):
    code: str = Field(examples=["pii.card", "regex", "capability"])
    rule: str = Field(description="The rule's id; constitution rules are prefixed `constitution:`.")
    message: str
    span: list[int] | None = Field(description="[start, end) of the match in `content`, if it has one.")


class DecisionOut(BaseModel):
    """A policy decision."""

    allowed: bool
    score: float = Field(ge=0, le=1)
    severity: Literal["none", "low", "medium", "high", "critical"]
    reasons: list[ReasonOut]
    constitution_hash: str
    policy_version: int


class PolicyPut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    document: dict[str, Any] = Field(description="The whole policy document (schema: `PolicyOut.document`).")
    base_version: int | None = Field(
        default=None, ge=0, description="The version this edit starts from; 409 if another is in force now."
    )


class PolicyOut(BaseModel):
    """One version of the tenant's policy (version 0: the built-in default, no rules)."""

    object: Literal["policy"] = "policy"
    tenant_id: str
    version: int
    document: PolicyDocument
    created_at: datetime | None
    created_by: str | None

    @classmethod
    def of(cls, stored: StoredPolicy) -> PolicyOut:
        return cls(
            tenant_id=stored.tenant_id,
            version=stored.version,
            document=stored.document,
            created_at=stored.created_at,
            created_by=stored.created_by,
        )


class RuleOut(BaseModel):
    """A rule and the policy version it is part of."""

    object: Literal["policy.rule"] = "policy.rule"
    version: int
    rule: Rule


class StrikeOut(BaseModel):
    object: Literal["policy.strike"] = "policy.strike"
    subject: str
    count: int
    window_started_at: datetime
    locked_until: datetime | None

    @classmethod
    def of(cls, state: StrikeState) -> StrikeOut:
        return cls(
            subject=state.subject,
            count=state.count,
            window_started_at=state.window_started_at,
            locked_until=state.locked_until,
        )


@router.post("/evaluate", response_model=DecisionOut, responses=error_responses(400, 401, 403))
async def evaluate(body: EvaluateIn, principal: ChatUseDep, services: ServicesDep) -> Response:
    """Decide: `{allowed, score, severity, reasons, constitution_hash, policy_version}`. A denial is an
    answer here (200), not an error; it is counted as a strike unless `dry_run`."""
    subject = body.subject or principal.subject
    if subject != principal.subject and not principal.can(Capability.POLICY_ADMIN):
        raise Forbidden(
            "deciding about another subject needs the `policy:admin` capability; omit `subject` to ask "
            "about yourself",
            code="missing_capability",
        )
    context = dict(body.context)
    if subject == principal.subject:
        context.pop("capabilities", None)  # the caller's own, not what it claims (the service fills them)
    request = EvalRequest(body.action, subject, body.resource, body.content, context)
    decision = await services.policy.evaluate(principal, request, count_strikes=not body.dry_run)
    return _json(decision.to_json())


@router.get("", response_model=PolicyOut, responses=error_responses(401, 403))
async def read_policy(principal: PolicyAdminDep, session: SessionDep) -> PolicyOut:
    """The policy in force."""
    return PolicyOut.of(await get_policy(session, principal.tenant_id))


@router.put("", response_model=PolicyOut, responses=error_responses(400, 401, 403, 409))
async def replace_policy(
    body: PolicyPut, principal: PolicyAdminDep, services: ServicesDep, session: SessionDep
) -> PolicyOut:
    """Store a new version of the whole policy; it is in force on every replica within
    `SOMA_POLICY_CACHE_TTL_S` (here at once)."""
    stored = await put_policy(session, principal, body.document, body.base_version)
    await session.commit()
    services.policy.forget(principal.tenant_id)
    return PolicyOut.of(stored)


@router.get("/versions", response_model=ListOut[PolicyOut], responses=error_responses(401, 403))
async def versions(principal: PolicyAdminDep, session: SessionDep) -> ListOut[PolicyOut]:
    """Every stored version, newest first."""
    return ListOut(data=[PolicyOut.of(s) for s in await list_versions(session, principal.tenant_id)])


@router.get("/versions/{version}", response_model=PolicyOut, responses=error_responses(401, 403, 404))
async def version(version: int, principal: PolicyAdminDep, session: SessionDep) -> PolicyOut:
    """One stored version."""
    return PolicyOut.of(await get_policy(session, principal.tenant_id, version))


@router.get("/rules", response_model=ListOut[RuleOut], responses=error_responses(401, 403))
async def rules(principal: PolicyAdminDep, session: SessionDep) -> ListOut[RuleOut]:
    """The rules in force."""
    stored = await get_policy(session, principal.tenant_id)
    return ListOut(data=[RuleOut(version=stored.version, rule=r) for r in stored.document.rules])


@router.post("/rules", response_model=RuleOut, status_code=201, responses=error_responses(400, 401, 403, 409))
async def add_rule(
    body: dict[str, Any], principal: PolicyAdminDep, services: ServicesDep, session: SessionDep
) -> RuleOut:
    """Add a rule (a new policy version)."""
    stored, rule = await put_rule(session, principal, body)
    await session.commit()
    services.policy.forget(principal.tenant_id)
    return RuleOut(version=stored.version, rule=rule)


@router.get("/rules/{rule_id}", response_model=RuleOut, responses=error_responses(401, 403, 404))
async def read_rule(rule_id: str, principal: PolicyAdminDep, session: SessionDep) -> RuleOut:
    """One rule in force."""
    stored = await get_policy(session, principal.tenant_id)
    for rule in stored.document.rules:
        if rule.id == rule_id:
            return RuleOut(version=stored.version, rule=rule)
    raise NotFound(f"no rule {rule_id!r} in the policy; GET /v1/policy/rules lists them", param="rule_id")


@router.put("/rules/{rule_id}", response_model=RuleOut, responses=error_responses(400, 401, 403, 404, 409))
async def replace_rule(
    rule_id: str, body: dict[str, Any], principal: PolicyAdminDep, services: ServicesDep, session: SessionDep
) -> RuleOut:
    """Replace a rule (a new policy version)."""
    stored, rule = await put_rule(session, principal, body, replace=rule_id)
    await session.commit()
    services.policy.forget(principal.tenant_id)
    return RuleOut(version=stored.version, rule=rule)


@router.delete("/rules/{rule_id}", response_model=PolicyOut, responses=error_responses(401, 403, 404, 409))
async def remove_rule(
    rule_id: str, principal: PolicyAdminDep, services: ServicesDep, session: SessionDep
) -> PolicyOut:
    """Remove a rule (a new policy version); answers the policy after."""
    stored = await delete_rule(session, principal, rule_id)
    await session.commit()
    services.policy.forget(principal.tenant_id)
    return PolicyOut.of(stored)


@router.get("/strikes", response_model=ListOut[StrikeOut], responses=error_responses(401, 403))
async def strikes(principal: PolicyAdminDep, services: ServicesDep) -> ListOut[StrikeOut]:
    """Subjects with moderation strikes, and whether they are locked out."""
    return ListOut(data=[StrikeOut.of(s) for s in await services.policy.strikes.list(principal.tenant_id)])


@router.delete("/strikes/{subject}", response_model=StrikeOut, responses=error_responses(401, 403, 404))
async def reset_strikes(subject: str, principal: PolicyAdminDep, services: ServicesDep) -> StrikeOut:
    """Clear a subject's strikes and lift its lockout (audited); answers what was cleared."""
    state = await services.policy.strikes.reset(principal, subject)
    services.relay.poke()
    return StrikeOut.of(state)


def _json(body: dict[str, Any]) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")
