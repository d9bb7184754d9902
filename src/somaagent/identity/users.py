"""Users and service accounts of a tenant: create, list, change role, disable, passwords. Every change
writes an audit event in its transaction; nobody appoints a role above their own."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.core.clock import utcnow
from somaagent.core.errors import Conflict, Forbidden, InvalidRequest, NotFound
from somaagent.core.ids import new_id
from somaagent.core.principal import Principal
from somaagent.events.outbox import audit
from somaagent.identity.capabilities import ROLES, may_assign_role
from somaagent.identity.passwords import hash_secret, password_problem, verify_secret
from somaagent.identity.service import actor_of, get_tenant
from somaagent.identity.tables import User
from somaagent.identity.throttle import account_key, clear

USERNAME = re.compile(r"^[a-z0-9][a-z0-9._@+-]{0,127}$")
KINDS = ("human", "service")
CLIENT_SECRET_PREFIX = "cs-soma-"  # noqa: S105  (a visible prefix, not a secret)


@dataclass(frozen=True)
class CreatedUser:
    """A new user; `client_secret` is set (and shown once) for service accounts."""

    user: User
    client_secret: str | None


def _check_role(principal: Principal | None, role: str) -> None:
    if role not in ROLES:
        raise InvalidRequest(f"role must be one of {', '.join(ROLES)}, not {role!r}", param="role")
    if principal is not None and not principal.is_admin and not may_assign_role(principal.role, role):
        raise Forbidden(f"a {principal.role} cannot appoint a {role}", code="role_escalation")


async def create_user(
    session: AsyncSession,
    principal: Principal | None,
    tenant_ref: str,
    username: str,
    role: str,
    *,
    kind: str = "human",
    password: str | None = None,
) -> CreatedUser:
    """Create a human user (with a password) or a service account (whose client secret is generated)."""
    tenant = await get_tenant(session, principal, tenant_ref)
    name = username.strip().lower()
    if not USERNAME.match(name):
        raise InvalidRequest(
            "usernames are 1-128 characters: letters, digits and . _ @ + - (starting with a letter or digit)",
            param="username",
        )
    if kind not in KINDS:
        raise InvalidRequest(f"kind must be one of {', '.join(KINDS)}", param="kind")
    _check_role(principal, role)
    client_secret = None
    if kind == "service":
        if password is not None:
            raise InvalidRequest(
                "service accounts get a generated client secret; omit password", param="password"
            )
        client_secret = CLIENT_SECRET_PREFIX + secrets.token_urlsafe(32)
        secret = client_secret
    else:
        if password is None:
            raise InvalidRequest("a human user needs a password", param="password")
        problem = password_problem(password)
        if problem:
            raise InvalidRequest(problem, param="password", code="weak_password")
        secret = password
    if await session.scalar(select(User.id).where(User.tenant_id == tenant.id, User.username == name)):
        raise Conflict(f"user {name!r} already exists in tenant {tenant.name!r}", param="username")
    now = utcnow()
    user = User(
        id=new_id("usr"),
        tenant_id=tenant.id,
        username=name,
        kind=kind,
        role=role,
        secret_hash=await hash_secret(secret),
        disabled=False,
        created_at=now,
        updated_at=now,
    )
    session.add(user)
    audit(
        session,
        actor_of(principal),
        tenant.id,
        "user.created",
        user_id=user.id,
        username=name,
        role=role,
        kind=kind,
    )
    try:
        await session.flush()
    except IntegrityError as exc:  # a concurrent create of the same name
        raise Conflict(f"user {name!r} already exists in tenant {tenant.name!r}", param="username") from exc
    return CreatedUser(user, client_secret)


async def list_users(
    session: AsyncSession, principal: Principal | None, tenant_ref: str | None
) -> list[User]:
    """The users of one tenant (default: the caller's)."""
    if tenant_ref is None:
        if principal is None:
            raise InvalidRequest("name a tenant", param="tenant")
        tenant_id = principal.tenant_id
    else:
        tenant_id = (await get_tenant(session, principal, tenant_ref)).id
    query = select(User).where(User.tenant_id == tenant_id).order_by(User.created_at, User.id)
    return list((await session.scalars(query)).all())


async def get_user(
    session: AsyncSession, principal: Principal | None, user_ref: str, tenant_ref: str | None = None
) -> User:
    """A user by id (or by username inside `tenant_ref` / the caller's tenant) that the caller may see."""
    query = select(User)
    if tenant_ref is not None:
        tenant_id: str | None = (await get_tenant(session, principal, tenant_ref)).id
    else:
        tenant_id = principal.tenant_id if principal is not None and not principal.is_admin else None
    if tenant_id is not None:
        query = query.where(
            User.tenant_id == tenant_id, (User.id == user_ref) | (User.username == user_ref.lower())
        )
    else:
        query = query.where(User.id == user_ref)
    user = await session.scalar(query)
    if user is None or (principal is not None and not principal.can_act_for(user.tenant_id)):
        raise NotFound(f"no user {user_ref!r}; list them with GET /v1/users", param="user")
    return user


def ensure_may_manage(principal: Principal | None, user: User) -> None:
    """Refuse managing `user` (role, disable, MFA reset, unlock, revocation) to anyone who does not outrank
    or equal them, and to the user themselves: an admin must not lift their own second factor."""
    if principal is None or principal.is_admin:
        return
    if principal.user_id == user.id:
        raise Forbidden("you cannot do this to your own account; ask another admin")
    if not may_assign_role(principal.role, user.role):
        raise Forbidden(
            f"a {principal.role or 'credential without a role'} cannot manage a {user.role}",
            code="role_escalation",
        )


async def update_user(
    session: AsyncSession,
    principal: Principal | None,
    user: User,
    *,
    role: str | None = None,
    disabled: bool | None = None,
) -> list[str]:
    """Change a user's role or disabled flag; returns what changed (the caller revokes tokens on a change)."""
    changed: list[str] = []
    ensure_may_manage(principal, user)
    actor = actor_of(principal)
    if role is not None and role != user.role:
        _check_role(principal, role)
        audit(session, actor, user.tenant_id, "user.role_changed", user_id=user.id, old=user.role, new=role)
        user.role = role
        changed.append("role")
    if disabled is not None and disabled != user.disabled:
        user.disabled = disabled
        audit(
            session, actor, user.tenant_id, "user.disabled" if disabled else "user.enabled", user_id=user.id
        )
        changed.append("disabled")
    if changed:
        user.updated_at = utcnow()
        await session.flush()
    return changed


async def change_password(session: AsyncSession, user: User, current: str, new: str) -> None:
    """A user changing their own password, which needs the current one."""
    if user.kind != "human":
        raise InvalidRequest("service accounts have client secrets, not passwords")
    if not await verify_secret(user.secret_hash, current):
        # 400, not 401: the caller's token is fine, and a 401 would read as "log in again".
        raise InvalidRequest(
            "the current password is not right", param="current_password", code="invalid_password"
        )
    problem = password_problem(new)
    if problem:
        raise InvalidRequest(problem, param="new_password", code="weak_password")
    user.secret_hash = await hash_secret(new)
    user.updated_at = utcnow()
    audit(session, f"user:{user.id}", user.tenant_id, "user.password_changed", user_id=user.id)
    await session.flush()


def login_throttle_key(user: User) -> str:
    """The key failed logins of `user` count against (service accounts log in by client id)."""
    return (
        account_key("client", user.id)
        if user.kind == "service"
        else account_key(user.tenant_id, user.username)
    )


async def unlock_user(session: AsyncSession, principal: Principal | None, user: User) -> bool:
    """Clear `user`'s failed-login lockout; whether there was anything to clear. Audited."""
    ensure_may_manage(principal, user)
    was_locked = await clear(session, login_throttle_key(user))
    audit(
        session, actor_of(principal), user.tenant_id, "user.unlocked", user_id=user.id, was_locked=was_locked
    )
    return was_locked
