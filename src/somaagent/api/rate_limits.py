"""`/v1/rate-limits`: requests per minute, tokens per minute and concurrent requests of a tenant, its
users and its keys (`policy:admin`; operators name another tenant with `?tenant=`)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.api.deps import PolicyAdminDep, ServicesDep, SessionDep
from somaagent.api.openai.docs import error_responses
from somaagent.core.errors import NotFound
from somaagent.core.principal import Principal
from somaagent.identity.service import act_for_tenant
from somaagent.identity.tables import ApiKey, User
from somaagent.policy.limits import RateLimitRow
from somaagent.policy.ratelimit import ScopeLimits

# The columns are 32-bit integers on every backend.
MAX_SETTING = 2**31 - 1

router = APIRouter(prefix="/v1/rate-limits", tags=["Governance"])

ScopeName = Literal["tenant", "user", "key"]


async def owned_scope_id(
    session: AsyncSession, principal: Principal, scope: str, scope_id: str | None
) -> str:
    """The id of the caller's tenant, or of one of its users or keys; anything else (another tenant's
    user or key included) is a 404, so ids of other tenants cannot be probed."""
    if scope == "tenant":
        if scope_id in (None, principal.tenant_id, principal.tenant_name):
            return principal.tenant_id
    elif scope_id is not None:
        table = User if scope == "user" else ApiKey
        found = await session.scalar(
            select(table.id).where(table.id == scope_id, table.tenant_id == principal.tenant_id)
        )
        if found is not None:
            return scope_id
    raise NotFound(
        f"no {scope} {scope_id!r} in tenant {principal.tenant_name!r}"
        + (
            "; a user or key budget or limit names its id (GET /v1/users, GET /v1/keys)"
            if scope != "tenant"
            else ""
        ),
        param="scope_id",
    )


class RateLimitIn(BaseModel):
    """The limits of one scope; null (or left out): no limit of that kind there."""

    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Field(
        default=None, ge=1, le=MAX_SETTING, description="Requests per minute (any 60 s window)."
    )
    tpm: int | None = Field(
        default=None,
        ge=1,
        le=MAX_SETTING,
        description="Tokens per minute (any 60 s window): prompt plus max_tokens are held at admission, "
        "what the call did not use is given back when it ends.",
    )
    concurrent: int | None = Field(
        default=None, ge=1, le=MAX_SETTING, description="Requests in flight at once."
    )


class RateLimitOut(BaseModel):
    """The stored limits of one scope."""

    object: Literal["rate_limit"] = "rate_limit"
    tenant_id: str
    scope: ScopeName
    scope_id: str
    rpm: int | None
    tpm: int | None
    concurrent: int | None
    updated_at: datetime

    @classmethod
    def of(cls, row: RateLimitRow) -> RateLimitOut:
        return cls(
            tenant_id=row.tenant_id,
            scope=row.scope,
            scope_id=row.scope_id,
            rpm=row.rpm,
            tpm=row.tpm,
            concurrent=row.concurrent,
            updated_at=row.updated_at,
        )


class DefaultLimitsOut(BaseModel):
    """The limits of scopes without a row of their own (SOMA_RATE_LIMIT_DEFAULTS)."""

    rpm: int | None
    tpm: int | None
    concurrent: int | None

    @classmethod
    def of(cls, limits: ScopeLimits) -> DefaultLimitsOut:
        return cls(rpm=limits.rpm, tpm=limits.tpm, concurrent=limits.concurrent)


class RateLimitListOut(BaseModel):
    """The tenant's stored limits, and the defaults of the scopes that have none."""

    object: Literal["list"] = "list"
    data: list[RateLimitOut]
    defaults: dict[str, DefaultLimitsOut] = Field(description="By scope: tenant, user, key.")


@router.get("", response_model=RateLimitListOut, responses=error_responses(401, 404))
async def list_rate_limits(
    principal: PolicyAdminDep, services: ServicesDep, session: SessionDep, tenant: str | None = None
) -> RateLimitListOut:
    """Every scope of the tenant with limits of its own; the rest get `defaults`."""
    acting = await act_for_tenant(session, principal, tenant)
    rows = await services.rate_limits.list(session, acting)
    return RateLimitListOut(
        data=[RateLimitOut.of(r) for r in rows],
        defaults={scope: DefaultLimitsOut.of(d) for scope, d in services.rate_limits.defaults.items()},
    )


@router.get("/{scope}/{scope_id}", response_model=RateLimitOut, responses=error_responses(400, 401, 404))
async def get_rate_limit(
    scope: ScopeName,
    scope_id: str,
    principal: PolicyAdminDep,
    services: ServicesDep,
    session: SessionDep,
    tenant: str | None = None,
) -> RateLimitOut:
    """The stored limits of one scope (404: none stored, the defaults apply)."""
    acting = await act_for_tenant(session, principal, tenant)
    scope_id = await owned_scope_id(session, acting, scope, scope_id)
    return RateLimitOut.of(await services.rate_limits.get(session, acting, scope, scope_id))


@router.put("/{scope}/{scope_id}", response_model=RateLimitOut, responses=error_responses(400, 401, 404))
async def put_rate_limit(
    scope: ScopeName,
    scope_id: str,
    body: RateLimitIn,
    principal: PolicyAdminDep,
    services: ServicesDep,
    session: SessionDep,
    tenant: str | None = None,
) -> RateLimitOut:
    """Set (replace) the limits of the tenant (its id or name), one of its users or one of its keys."""
    acting = await act_for_tenant(session, principal, tenant)
    scope_id = await owned_scope_id(session, acting, scope, scope_id)
    row = await services.rate_limits.set(
        session, acting, scope, scope_id, body.rpm, body.tpm, body.concurrent
    )
    await session.commit()
    services.rate_limits.invalidate(acting.tenant_id)
    services.relay.poke()
    return RateLimitOut.of(row)


@router.delete("/{scope}/{scope_id}", response_model=RateLimitOut, responses=error_responses(400, 401, 404))
async def delete_rate_limit(
    scope: ScopeName,
    scope_id: str,
    principal: PolicyAdminDep,
    services: ServicesDep,
    session: SessionDep,
    tenant: str | None = None,
) -> RateLimitOut:
    """Remove a scope's own limits: the defaults apply to it again."""
    acting = await act_for_tenant(session, principal, tenant)
    scope_id = await owned_scope_id(session, acting, scope, scope_id)
    row = await services.rate_limits.delete(session, acting, scope, scope_id)
    await session.commit()
    services.rate_limits.invalidate(acting.tenant_id)
    services.relay.poke()
    return RateLimitOut.of(row)
