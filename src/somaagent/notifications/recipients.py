"""Who a notification reaches: the tenant's people, read from identity's `users` table by name.

Notifications may not import identity; the few columns read here (id, username, role, disabled) are
stable parts of identity's schema, so a plain read-only query is the smallest coupling.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.core.errors import NotFound

ADMIN_ROLES = ("owner", "admin")


@dataclass(frozen=True, slots=True)
class Recipient:
    """A user of the tenant who may be told something."""

    user_id: str
    username: str
    role: str
    disabled: bool = False


# Read-only, by table name: identity owns `users`.
_ACTIVE_USERS = text(
    "SELECT id, username, role FROM users WHERE tenant_id = :tenant_id AND disabled = :disabled ORDER BY id"
)
_ONE_USER = text(
    "SELECT id, username, role, disabled FROM users WHERE tenant_id = :tenant_id AND id = :user_id"
)


async def active_users(session: AsyncSession, tenant_id: str) -> list[Recipient]:
    """Every enabled user of the tenant."""
    rows = await session.execute(_ACTIVE_USERS, {"tenant_id": tenant_id, "disabled": False})
    return [Recipient(r[0], r[1], r[2]) for r in rows]


async def find_user(session: AsyncSession, tenant_id: str, user_id: str) -> Recipient | None:
    """The tenant's user `user_id` (enabled or not), or None."""
    row = (await session.execute(_ONE_USER, {"tenant_id": tenant_id, "user_id": user_id})).first()
    return Recipient(row[0], row[1], row[2], bool(row[3])) if row is not None else None


async def require_user(
    session: AsyncSession, tenant_id: str, user_id: str, param: str = "user_id"
) -> Recipient:
    """The tenant's user `user_id`; 404 naming `param` when the tenant has none (other tenants' users do
    not exist here)."""
    found = await find_user(session, tenant_id, user_id)
    if found is None:
        raise NotFound(f"no user {user_id!r} in this tenant; list them with GET /v1/users", param=param)
    return found


async def audience_of(
    session: AsyncSession, tenant_id: str, audience: str, user_id: str | None
) -> list[Recipient]:
    """The people an audience names: one user, the admins (owner/admin roles), or everyone."""
    if audience == "user":
        if user_id is None:
            return []
        found = await find_user(session, tenant_id, user_id)
        return [found] if found is not None and not found.disabled else []
    people = await active_users(session, tenant_id)
    if audience == "admins":
        return [p for p in people if p.role in ADMIN_ROLES]
    return people
