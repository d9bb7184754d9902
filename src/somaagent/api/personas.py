"""`/v1/personas`: a tenant's named agents (system prompt, model, allowed tools, memory, limits)."""

from __future__ import annotations

from fastapi import APIRouter

from somaagent.agents import personas
from somaagent.agents.schemas import PersonaIn, PersonaOut, PersonaPatch
from somaagent.api.deps import AgentsAdminDep, ChatUseDep, ServicesDep, SessionDep
from somaagent.api.openai.docs import error_responses
from somaagent.api.services import Services
from somaagent.core.pagination import ListOut
from somaagent.core.principal import Principal

router = APIRouter(prefix="/v1/personas", tags=["Agents"])


async def _check_model(services: Services, principal: Principal, model: str | None) -> None:
    if model is not None:
        await services.router.candidates(principal, model)  # 404 naming the models one may use


@router.post("", response_model=PersonaOut, status_code=201, responses=error_responses(400, 401, 404, 409))
async def create_persona(
    body: PersonaIn, principal: AgentsAdminDep, services: ServicesDep, session: SessionDep
) -> PersonaOut:
    await _check_model(services, principal, body.model)
    row = await personas.create_persona(session, principal, body)
    await session.commit()
    return PersonaOut.of(row)


@router.get("", response_model=ListOut[PersonaOut], responses=error_responses(401))
async def list_personas(principal: ChatUseDep, session: SessionDep) -> ListOut[PersonaOut]:
    return ListOut(data=[PersonaOut.of(r) for r in await personas.list_personas(session, principal)])


@router.get("/{name}", response_model=PersonaOut, responses=error_responses(401, 404))
async def get_persona(name: str, principal: ChatUseDep, session: SessionDep) -> PersonaOut:
    return PersonaOut.of(await personas.get_persona(session, principal, name))


@router.patch("/{name}", response_model=PersonaOut, responses=error_responses(400, 401, 404))
async def update_persona(
    name: str, body: PersonaPatch, principal: AgentsAdminDep, services: ServicesDep, session: SessionDep
) -> PersonaOut:
    await _check_model(services, principal, body.model)
    row = await personas.update_persona(session, principal, name, body)
    await session.commit()
    return PersonaOut.of(row)


@router.delete("/{name}", response_model=PersonaOut, responses=error_responses(401, 404))
async def delete_persona(name: str, principal: AgentsAdminDep, session: SessionDep) -> PersonaOut:
    row = await personas.delete_persona(session, principal, name)
    await session.commit()
    return PersonaOut.of(row)
