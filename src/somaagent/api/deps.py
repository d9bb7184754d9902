"""Dependency aliases: each route's signature states its auth contract (`PrincipalDep`, `AdminDep`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.api.services import Services
from somaagent.core.errors import Forbidden
from somaagent.core.principal import Principal

# Declared for the OpenAPI document; authentication itself reads the raw header so that a
# missing or malformed key gets our precise error instead of a generic 403.
_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer sk-soma-...`")


async def get_services(request: Request) -> Services:
    """The process's shared services (async: FastAPI would run a sync dependency in a thread)."""
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_principal(
    request: Request,
    services: ServicesDep,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The authenticated caller."""
    return await services.authenticator.authenticate(request.headers.get("authorization"))


PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def get_admin(principal: PrincipalDep) -> Principal:
    """The caller, who must hold an admin key."""
    if not principal.is_admin:
        raise Forbidden(
            "this endpoint needs an admin key; create one with `soma keys create --tenant T --admin`"
        )
    return principal


AdminDep = Annotated[Principal, Depends(get_admin)]


async def get_session(services: ServicesDep) -> AsyncIterator[AsyncSession]:
    """A database session for the request; the route commits what it changes."""
    async with services.sessions() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]
