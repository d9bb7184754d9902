"""Personas per tenant: create, list, get, update, delete; and the default one when a session has none."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.agents.schemas import MemoryPolicy, PersonaIn, PersonaPatch, RunLimits
from somaagent.agents.tables import Persona
from somaagent.core.clock import utcnow
from somaagent.core.errors import Conflict, NotFound
from somaagent.core.ids import new_id
from somaagent.core.principal import Principal

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Answer briefly and truthfully."


@dataclass(frozen=True, slots=True)
class PersonaSpec:
    """What a run needs of its persona (a stored one, or the default)."""

    name: str | None
    system_prompt: str
    model: str | None
    tools: list[str] | None
    memory: MemoryPolicy
    limits: RunLimits

    @classmethod
    def of(cls, row: Persona | None) -> PersonaSpec:
        if row is None:
            return cls(None, DEFAULT_SYSTEM_PROMPT, None, None, MemoryPolicy(), RunLimits())
        return cls(
            row.name,
            row.system_prompt or DEFAULT_SYSTEM_PROMPT,
            row.model,
            row.tools,
            MemoryPolicy(**row.memory),
            RunLimits(**row.limits),
        )


async def create_persona(session: AsyncSession, principal: Principal, body: PersonaIn) -> Persona:
    """A new persona; its name is unique in the tenant (the caller commits)."""
    now = utcnow()
    row = Persona(
        id=new_id("per"),
        tenant_id=principal.tenant_id,
        name=body.name,
        description=body.description,
        system_prompt=body.system_prompt,
        model=body.model,
        tools=body.tools,
        memory=body.memory.model_dump(),
        limits=body.limits.model_dump(),
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    try:
        await session.flush()
    except IntegrityError as exc:
        await session.rollback()
        raise Conflict(f"a persona named {body.name!r} exists already", param="name") from exc
    return row


async def get_persona(session: AsyncSession, principal: Principal, name: str) -> Persona:
    """The tenant's persona called `name` (or with that id)."""
    row = await session.scalar(
        select(Persona).where(
            Persona.tenant_id == principal.tenant_id, (Persona.name == name) | (Persona.id == name)
        )
    )
    if row is None:
        raise NotFound(f"no persona {name!r}; create it with POST /v1/personas", param="persona")
    return row


async def list_personas(session: AsyncSession, principal: Principal) -> list[Persona]:
    """The tenant's personas by name."""
    query = select(Persona).where(Persona.tenant_id == principal.tenant_id).order_by(Persona.name)
    return list((await session.scalars(query)).all())


async def update_persona(
    session: AsyncSession, principal: Principal, name: str, patch: PersonaPatch
) -> Persona:
    """Change the fields given (the caller commits)."""
    row = await get_persona(session, principal, name)
    given = patch.model_dump(exclude_unset=True)
    for field in ("description", "system_prompt", "model", "tools"):
        if field in given:
            setattr(row, field, given[field])
    if patch.memory is not None:
        row.memory = patch.memory.model_dump()
    if patch.limits is not None:
        row.limits = patch.limits.model_dump()
    row.updated_at = utcnow()
    await session.flush()
    return row


async def delete_persona(session: AsyncSession, principal: Principal, name: str) -> Persona:
    """Remove a persona; sessions that named it keep running with the default persona."""
    row = await get_persona(session, principal, name)
    await session.delete(row)
    await session.flush()
    return row
