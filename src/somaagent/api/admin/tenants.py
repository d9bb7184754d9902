"""`/v1/tenants`: create (operators), list and get (operators see all, tenants themselves), settings."""

from __future__ import annotations

from fastapi import APIRouter

from somaagent.api.deps import ChatUseDep, OperatorDep, ServicesDep, SessionDep, UsersAdminDep
from somaagent.api.openai.docs import error_responses
from somaagent.core.pagination import ListOut
from somaagent.identity import service
from somaagent.identity.auth_schemas import TenantPatch
from somaagent.identity.schemas import TenantCreate, TenantOut
from somaagent.identity.users import list_users

router = APIRouter(prefix="/v1/tenants", tags=["Tenants"])


@router.post("", response_model=TenantOut, status_code=201, responses=error_responses(400, 401, 403, 409))
async def create_tenant(body: TenantCreate, principal: OperatorDep, session: SessionDep) -> TenantOut:
    tenant = await service.create_tenant(session, principal, body.name)
    await session.commit()
    return TenantOut.of(tenant)


@router.get("", response_model=ListOut[TenantOut], responses=error_responses(401))
async def list_tenants(principal: ChatUseDep, session: SessionDep) -> ListOut[TenantOut]:
    return ListOut(data=[TenantOut.of(t) for t in await service.list_tenants(session, principal)])


@router.get("/{tenant}", response_model=TenantOut, responses=error_responses(401, 404))
async def get_tenant(tenant: str, principal: ChatUseDep, session: SessionDep) -> TenantOut:
    return TenantOut.of(await service.get_tenant(session, principal, tenant))


@router.patch("/{tenant}", response_model=TenantOut, responses=error_responses(400, 401, 403, 404))
async def update_tenant(
    tenant: str, body: TenantPatch, principal: UsersAdminDep, services: ServicesDep, session: SessionDep
) -> TenantOut:
    """Require MFA of every user (`users:admin`), or disable the tenant (operators)."""
    updated = await service.update_tenant(
        session, principal, tenant, require_mfa=body.require_mfa, disabled=body.disabled
    )
    if body.disabled:
        # Access tokens carry no tenant state: revoke every user's, so the tenant stops within a poll.
        for user in await list_users(session, principal, updated.id):
            await services.logins.revoke_user_tokens(session, principal, user)
    await session.commit()
    services.authenticator.invalidate()
    return TenantOut.of(updated)
