"""First start: a `default` tenant and an admin key, so a fresh install is usable at once."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.core.errors import Conflict
from somaagent.identity.service import create_key, create_tenant
from somaagent.identity.tables import Tenant

DEFAULT_TENANT = "default"


async def bootstrap_admin_key(session: AsyncSession, secret: bytes) -> str | None:
    """Create the default tenant and an admin key if there are no tenants yet; the key, or None."""
    if await session.scalar(select(Tenant.id).limit(1)) is not None:
        return None
    try:
        await create_tenant(session, None, DEFAULT_TENANT)
    except Conflict:  # another replica got there first
        return None
    created = await create_key(session, None, secret, DEFAULT_TENANT, "bootstrap-admin", scope="admin")
    return created.secret
