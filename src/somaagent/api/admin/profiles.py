"""`/v1/model-profiles`: a tenant's model per role, with fallbacks."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from somaagent.api.deps import ChatUseDep, ModelsAdminDep, ServicesDep, SessionDep
from somaagent.api.openai.docs import error_responses
from somaagent.core.pagination import ListOut
from somaagent.identity.service import get_tenant
from somaagent.models import profiles
from somaagent.models.schemas import ProfileOut, ProfileSet

router = APIRouter(prefix="/v1/model-profiles", tags=["Models"])


@router.get("", response_model=ListOut[ProfileOut], responses=error_responses(401, 404))
async def list_profiles(
    principal: ChatUseDep, session: SessionDep, tenant: str | None = None
) -> ListOut[ProfileOut]:
    tenant_id = (await get_tenant(session, principal, tenant)).id if tenant else principal.tenant_id
    return ListOut(data=[ProfileOut.of(p) for p in await profiles.list_profiles(session, tenant_id)])


@router.put("/{role}", response_model=ProfileOut, responses=error_responses(400, 401, 404))
async def set_profile(
    role: str, body: ProfileSet, principal: ModelsAdminDep, services: ServicesDep, session: SessionDep
) -> ProfileOut:
    tenant_id = (await get_tenant(session, principal, body.tenant)).id if body.tenant else principal.tenant_id
    profile = await profiles.set_profile(session, services.catalog, principal, tenant_id, role, body.models)
    await session.commit()
    services.profiles.invalidate(tenant_id)
    return ProfileOut.of(profile)


@router.delete("/{role}", status_code=204, responses=error_responses(400, 401, 404))
async def delete_profile(
    role: str,
    principal: ModelsAdminDep,
    services: ServicesDep,
    session: SessionDep,
    tenant: str | None = None,
) -> Response:
    tenant_id = (await get_tenant(session, principal, tenant)).id if tenant else principal.tenant_id
    await profiles.delete_profile(session, tenant_id, role)
    await session.commit()
    services.profiles.invalidate(tenant_id)
    return Response(status_code=204)
