"""Model profiles per tenant: which models serve each role, in fallback order."""

from __future__ import annotations

import time

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.core.clock import utcnow
from somaagent.core.errors import InvalidRequest, NotFound
from somaagent.core.principal import Principal
from somaagent.models.catalog import PROFILE_PREFIX, ModelCatalog
from somaagent.models.tables import ModelProfile

ROLES = ("chat", "planning", "code", "embedding")


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise InvalidRequest(f"unknown profile role {role!r}; roles are {', '.join(ROLES)}", param="role")


async def set_profile(
    session: AsyncSession,
    catalog: ModelCatalog,
    principal: Principal,
    tenant_id: str,
    role: str,
    models: list[str],
) -> ModelProfile:
    """Create or replace a tenant's profile for `role`; each model must exist, be allowed, fit the role."""
    _check_role(role)
    if not models or len(models) > 10:
        raise InvalidRequest("a profile lists 1 to 10 models, tried in order", param="models")
    for model_id in models:
        entry = catalog.get(principal, model_id)
        if (role == "embedding") != (entry.embedder is not None):
            kind = "an embedding" if entry.embedder is not None else "a chat"
            raise InvalidRequest(
                f"{model_id!r} is {kind} model and cannot serve role {role!r}", param="models"
            )
    profile = await session.get(ModelProfile, (tenant_id, role))
    if profile is None:
        profile = ModelProfile(tenant_id=tenant_id, role=role, models=list(models), updated_at=utcnow())
        session.add(profile)
    else:
        profile.models = list(models)
        profile.updated_at = utcnow()
    await session.flush()
    return profile


async def list_profiles(session: AsyncSession, tenant_id: str) -> list[ModelProfile]:
    """A tenant's profiles."""
    rows = await session.scalars(
        select(ModelProfile).where(ModelProfile.tenant_id == tenant_id).order_by(ModelProfile.role)
    )
    return list(rows.all())


async def delete_profile(session: AsyncSession, tenant_id: str, role: str) -> None:
    """Remove a tenant's profile for `role`."""
    _check_role(role)
    profile = await session.get(ModelProfile, (tenant_id, role))
    if profile is None:
        raise NotFound(f"no {role!r} profile for this tenant", param="role")
    await session.delete(profile)


class ProfileCache:
    """Profiles per tenant, cached briefly: routing `profile:*` and listing models must not cost a
    database round trip per request. Changes made here are seen at once; other replicas' within `ttl_s`."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], ttl_s: float = 2.0) -> None:
        self._sessions = sessions
        self._ttl_s = ttl_s
        self._cache: dict[str, tuple[dict[str, list[str]], float]] = {}

    async def for_tenant(self, tenant_id: str) -> dict[str, list[str]]:
        """role → models for one tenant."""
        hit = self._cache.get(tenant_id)
        now = time.monotonic()
        if hit is not None and hit[1] > now:
            return hit[0]
        async with self._sessions() as session:
            profiles = {p.role: list(p.models) for p in await list_profiles(session, tenant_id)}
        self._cache[tenant_id] = (profiles, now + self._ttl_s)
        return profiles

    async def models_for(self, principal: Principal, model: str) -> list[str]:
        """The fallback list behind `profile:<role>` for the caller's tenant."""
        role = model[len(PROFILE_PREFIX) :]
        _check_role(role)
        models = (await self.for_tenant(principal.tenant_id)).get(role)
        if models is None:
            raise NotFound(
                f"this tenant has no {role!r} profile; create one with "
                f"`soma models profile set --tenant T {role} MODEL [MODEL...]`",
                param="model",
                code="model_not_found",
            )
        return models

    def invalidate(self, tenant_id: str) -> None:
        """Forget one tenant's cached profiles (after a change)."""
        self._cache.pop(tenant_id, None)
