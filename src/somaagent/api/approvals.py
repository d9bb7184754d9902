"""`/v1/approvals`: the tool calls waiting for a person, and their decisions — the caller's tenant only.

Reading and deciding both need `tools:approve`: an approval shows a call's arguments, which belong to
whoever started the run, not to everyone in the tenant.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from somaagent.api.deps import ServicesDep, ToolsApproveDep
from somaagent.api.openai.docs import error_responses
from somaagent.identity.service import person_behind
from somaagent.tools.approvals import arguments_of
from somaagent.tools.tables import Approval

router = APIRouter(prefix="/v1/approvals", tags=["Approvals"])
Status = Literal["pending", "approved", "rejected", "expired", "cancelled"]


class ApprovalOut(BaseModel):
    object: Literal["approval"] = "approval"
    id: str
    status: Status
    tool: str
    arguments: Any = Field(description="The call's arguments as the model sent them.")
    reason: str = Field(description="Why the call needs a person.")
    side_effect: str
    two_key: bool = Field(description="A second person must approve it, and the policy must allow it then.")
    session_id: str | None
    run_id: str | None
    call_id: str | None
    requested_by: str
    decided_by: str | None = Field(description="Who decided; `system` for expiry or an ended run.")
    note: str | None
    created_at: datetime
    expires_at: datetime
    decided_at: datetime | None

    @classmethod
    def of(cls, row: Approval) -> ApprovalOut:
        return cls(
            id=row.id,
            status=row.status,
            tool=row.tool,
            arguments=arguments_of(row),
            reason=row.reason,
            side_effect=row.side_effect,
            two_key=row.two_key,
            session_id=row.session_id,
            run_id=row.run_id,
            call_id=row.call_id,
            requested_by=row.requested_by,
            decided_by=row.decided_by,
            note=row.note,
            created_at=row.created_at,
            expires_at=row.expires_at,
            decided_at=row.decided_at,
        )


class ApprovalListOut(BaseModel):
    object: Literal["list"] = "list"
    data: list[ApprovalOut]
    has_more: bool


class DecisionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decision: Literal["approve", "reject"]
    note: str | None = Field(
        default=None, max_length=2_000, description="Shown to the model when the call is rejected."
    )


@router.get("", response_model=ApprovalListOut, responses=error_responses(400, 401, 403))
async def list_approvals(
    principal: ToolsApproveDep,
    services: ServicesDep,
    status: Annotated[Status | None, Query(description="Only approvals in this state.")] = None,
    session_id: Annotated[str | None, Query(max_length=40, description="Only this session's.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=40, description="Approvals older than this id.")] = None,
) -> ApprovalListOut:
    """The tenant's approvals, newest first."""
    rows = await services.approvals.list_approvals(principal, status, session_id, limit + 1, after)
    return ApprovalListOut(data=[ApprovalOut.of(r) for r in rows[:limit]], has_more=len(rows) > limit)


@router.get("/{approval_id}", response_model=ApprovalOut, responses=error_responses(401, 403, 404))
async def get_approval(approval_id: str, principal: ToolsApproveDep, services: ServicesDep) -> ApprovalOut:
    await services.approvals.expire_overdue(principal.tenant_id)
    return ApprovalOut.of(await services.approvals.get(principal, approval_id))


@router.post("/{approval_id}", response_model=ApprovalOut, responses=error_responses(400, 401, 403, 404, 409))
async def decide_approval(
    approval_id: str, body: DecisionIn, principal: ToolsApproveDep, services: ServicesDep
) -> ApprovalOut:
    """Approve (the waiting call runs) or reject (the model is told, with the note). Two-key approvals
    need someone other than the caller of the tool (403 `four_eyes_required`); a decided or expired
    approval answers 409 with its `status`."""
    pending = await services.approvals.get(principal, approval_id)
    async with services.sessions() as session:
        person = await person_behind(session, principal.tenant_id, pending.requested_by)
    row = await services.approvals.decide(principal, approval_id, body.decision, body.note, person)
    return ApprovalOut.of(row)
