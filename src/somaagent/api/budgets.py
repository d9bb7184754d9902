"""`/v1/budgets`: spend limits of a tenant, its users and its keys, with what each has spent and holds
(`billing:read` to read, `policy:admin` to change; operators name another tenant with `?tenant=`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from somaagent.api.deps import BillingReadDep, PolicyAdminDep, ServicesDep, SessionDep
from somaagent.api.openai.docs import error_responses
from somaagent.api.rate_limits import owned_scope_id
from somaagent.core.pagination import ListOut
from somaagent.identity.service import act_for_tenant
from somaagent.policy.budgets import MAX_LIMIT, BudgetStatus

router = APIRouter(prefix="/v1/budgets", tags=["Governance"])


class BudgetIn(BaseModel):
    """A new budget."""

    model_config = ConfigDict(extra="forbid")

    scope: Literal["tenant", "user", "key"] = Field(description="What the budget limits.")
    scope_id: str | None = Field(
        default=None,
        description="The user's or key's id; for `tenant`, the tenant's id or name (default: the caller's).",
    )
    unit: Literal["tokens", "usd"] = Field(
        description="`tokens` (prompt + completion) or `usd` (at the model's price; limit in micro-USD)."
    )
    limit: int = Field(
        ge=0, le=MAX_LIMIT, description="In tokens, or micro-USD for `usd` (1 USD = 1000000). 0 blocks all."
    )
    period: Literal["day", "month", "total"] = Field(
        description="`day` and `month` reset at 00:00 UTC (the first of the month); `total` never resets."
    )


class BudgetPatch(BaseModel):
    """A budget's new limit (scope, unit and period are fixed: delete and create to change them)."""

    model_config = ConfigDict(extra="forbid")

    limit: int = Field(ge=0, le=MAX_LIMIT, description="In tokens, or micro-USD for `usd`.")


class BudgetOut(BaseModel):
    """A budget with its counter in the current period."""

    object: Literal["budget"] = "budget"
    id: str
    tenant_id: str
    scope: str
    scope_id: str
    unit: str
    limit: int
    period: str
    period_start: datetime
    resets_at: datetime | None = Field(description="When the counter starts over; null for `total`.")
    spent: int = Field(description="Settled spend this period (may pass `limit` by what calls overran).")
    reserved: int = Field(description="Held by calls in flight (their worst case).")
    remaining: int = Field(description="`limit - spent - reserved`, at least 0.")
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, status: BudgetStatus) -> BudgetOut:
        budget = status.budget
        return cls(
            id=budget.id,
            tenant_id=budget.tenant_id,
            scope=budget.scope,
            scope_id=budget.scope_id,
            unit=budget.unit,
            limit=budget.limit,
            period=budget.period,
            period_start=status.period_start,
            resets_at=status.resets_at,
            spent=status.spent,
            reserved=status.reserved,
            remaining=status.remaining,
            created_at=budget.created_at,
            updated_at=budget.updated_at,
        )


@router.post("", response_model=BudgetOut, status_code=201, responses=error_responses(400, 401, 404, 409))
async def create_budget(
    body: BudgetIn,
    principal: PolicyAdminDep,
    services: ServicesDep,
    session: SessionDep,
    tenant: str | None = None,
) -> BudgetOut:
    """Limit the spend of the tenant, one of its users or one of its keys."""
    acting = await act_for_tenant(session, principal, tenant)
    scope_id = await owned_scope_id(session, acting, body.scope, body.scope_id)
    budget = await services.budgets.create(
        session, acting, body.scope, scope_id, body.unit, body.limit, body.period
    )
    await session.commit()
    services.budgets.invalidate(acting.tenant_id)
    services.relay.poke()
    return BudgetOut.of(await services.budgets.budget_status(acting, budget))


@router.get("", response_model=ListOut[BudgetOut], responses=error_responses(401, 404))
async def list_budgets(
    principal: BillingReadDep, services: ServicesDep, session: SessionDep, tenant: str | None = None
) -> ListOut[BudgetOut]:
    """The tenant's budgets with what each has spent and holds in its current period."""
    acting = await act_for_tenant(session, principal, tenant)
    budgets = await services.budgets.list_budgets(session, acting)
    return ListOut(data=[BudgetOut.of(s) for s in await services.budgets.statuses(budgets)])


@router.get("/{budget_id}", response_model=BudgetOut, responses=error_responses(401, 404))
async def get_budget(
    budget_id: str,
    principal: BillingReadDep,
    services: ServicesDep,
    session: SessionDep,
    tenant: str | None = None,
) -> BudgetOut:
    """One budget with its current spend."""
    acting = await act_for_tenant(session, principal, tenant)
    budget = await services.budgets.get(session, acting, budget_id)
    return BudgetOut.of(await services.budgets.budget_status(acting, budget))


@router.patch("/{budget_id}", response_model=BudgetOut, responses=error_responses(400, 401, 404))
async def update_budget(
    budget_id: str,
    body: BudgetPatch,
    principal: PolicyAdminDep,
    services: ServicesDep,
    session: SessionDep,
    tenant: str | None = None,
) -> BudgetOut:
    """Change a budget's limit; it applies to the current period at once."""
    acting = await act_for_tenant(session, principal, tenant)
    budget = await services.budgets.update(session, acting, budget_id, body.limit)
    await session.commit()
    services.budgets.invalidate(acting.tenant_id)
    services.relay.poke()
    return BudgetOut.of(await services.budgets.budget_status(acting, budget))


@router.delete("/{budget_id}", response_model=BudgetOut, responses=error_responses(401, 404))
async def delete_budget(
    budget_id: str,
    principal: PolicyAdminDep,
    services: ServicesDep,
    session: SessionDep,
    tenant: str | None = None,
) -> BudgetOut:
    """Remove a budget (and its counters); calls are no longer limited by it."""
    acting = await act_for_tenant(session, principal, tenant)
    budget = await services.budgets.get(session, acting, budget_id)
    status = await services.budgets.budget_status(acting, budget)
    await services.budgets.delete(session, acting, budget_id)
    await session.commit()
    services.budgets.invalidate(acting.tenant_id)
    services.relay.poke()
    return BudgetOut.of(status)
