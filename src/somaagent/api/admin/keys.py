"""`/v1/keys`: create, list and revoke (`keys:admin`; operators for any tenant, others their own)."""

from __future__ import annotations

from fastapi import APIRouter

from somaagent.api.deps import KeysAdminDep, ServicesDep, SessionDep
from somaagent.api.openai.docs import error_responses
from somaagent.core.pagination import ListOut
from somaagent.identity import service
from somaagent.identity.schemas import KeyCreate, KeyCreated, KeyOut

router = APIRouter(prefix="/v1/keys", tags=["API keys"])


@router.post("", response_model=KeyCreated, status_code=201, responses=error_responses(400, 401, 403, 404))
async def create_key(
    body: KeyCreate, principal: KeysAdminDep, services: ServicesDep, session: SessionDep
) -> KeyCreated:
    created = await service.create_key(
        session,
        principal,
        services.secret,
        body.tenant or principal.tenant_id,
        body.name,
        body.scope,
        body.capabilities,
        body.role,
    )
    await session.commit()
    return KeyCreated(**KeyOut.of(created.key).model_dump(), key=created.secret)


@router.get("", response_model=ListOut[KeyOut], responses=error_responses(401, 404))
async def list_keys(
    principal: KeysAdminDep, session: SessionDep, tenant: str | None = None
) -> ListOut[KeyOut]:
    keys = await service.list_keys(
        session, principal, tenant or (None if principal.is_admin else principal.tenant_id)
    )
    return ListOut(data=[KeyOut.of(k) for k in keys])


@router.delete("/{key}", response_model=KeyOut, responses=error_responses(401, 403, 404))
async def revoke_key(key: str, principal: KeysAdminDep, services: ServicesDep, session: SessionDep) -> KeyOut:
    revoked = await service.revoke_key(session, principal, key)
    await session.commit()
    services.authenticator.invalidate()
    return KeyOut.of(revoked)
