"""Tenants and API keys: create, list, revoke. Every change writes an audit event in its transaction."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import datetime

from sqlalchemy import case, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.core.clock import utcnow
from somaagent.core.errors import Conflict, Forbidden, InvalidRequest, NotFound
from somaagent.core.ids import new_id
from somaagent.core.principal import Principal
from somaagent.events.outbox import audit
from somaagent.identity.capabilities import (
    DEFAULT_KEY_ROLE,
    OPERATOR_CAPABILITIES,
    ROLE_CAPABILITIES,
    ROLES,
    may_assign_role,
    parse_capabilities,
)
from somaagent.identity.keys import generate_key, hash_key, visible_prefix
from somaagent.identity.tables import ApiKey, RevocationEpoch, Tenant

TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
TENANT_ID_PREFIX = "ten"  # ids are `ten_<hex>`
KEY_SCOPES = ("tenant", "admin")


@dataclass(frozen=True)
class CreatedKey:
    """A new key: `secret` is shown once and never stored."""

    key: ApiKey
    secret: str


def _require_admin(principal: Principal) -> None:
    if not principal.is_admin:
        raise Forbidden("this needs an admin key; create one with `soma keys create --tenant T --admin`")


def _key_grant(
    principal: Principal | None, scope: str, role: str | None, requested: list[str] | None
) -> tuple[str | None, frozenset[str]]:
    """A new key's role and capabilities: admin keys are the operator; tenant keys act as `role` (default
    member) with its capabilities, narrowed to `requested`. A non-operator can give neither a role above
    their own nor a capability they lack."""
    if scope == "admin":
        if requested is not None or role is not None:
            raise InvalidRequest("admin keys hold every capability; omit role and capabilities", param="role")
        return None, OPERATOR_CAPABILITIES
    role = role or DEFAULT_KEY_ROLE
    if role not in ROLES:
        raise InvalidRequest(f"role must be one of {', '.join(ROLES)}, not {role!r}", param="role")
    if principal is not None and not principal.is_admin and not may_assign_role(principal.role, role):
        raise Forbidden(
            f"a {principal.role or 'key without a role'} cannot make a {role} key", code="role_escalation"
        )
    allowed = ROLE_CAPABILITIES[role]
    try:
        wanted = allowed if requested is None else parse_capabilities(requested)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="capabilities") from exc
    outside = wanted - allowed
    if outside:
        raise InvalidRequest(
            f"{', '.join(sorted(outside))} is not part of the {role} role; give the key a higher role",
            param="capabilities",
        )
    if principal is None:
        return role, wanted
    missing = wanted - principal.capabilities
    if missing and requested is None:
        return role, wanted & principal.capabilities
    if missing:
        raise Forbidden(
            f"you cannot grant {', '.join(sorted(missing))}: you do not hold it", code="capability_escalation"
        )
    return role, wanted


def key_capabilities(key_scope: str, stored: str) -> frozenset[str]:
    """The capabilities a stored key carries (admin keys follow the current operator set)."""
    return OPERATOR_CAPABILITIES if key_scope == "admin" else frozenset(stored.split())


async def create_tenant(session: AsyncSession, principal: Principal | None, name: str) -> Tenant:
    """Create a tenant (admins only; `principal=None` is the local CLI, which is the operator)."""
    if principal is not None:
        _require_admin(principal)
    if not TENANT_NAME.match(name):
        raise InvalidRequest(
            f"invalid tenant name {name!r}: use 1-63 lowercase letters, digits, '-' or '_'", param="name"
        )
    if name.startswith(TENANT_ID_PREFIX + "_"):  # `?tenant=` and the CLI take an id or a name: never both
        raise InvalidRequest(
            f"invalid tenant name {name!r}: names may not start with '{TENANT_ID_PREFIX}_', as ids do",
            param="name",
        )
    if await session.scalar(select(Tenant.id).where(Tenant.name == name)):
        raise Conflict(f"tenant {name!r} already exists", param="name")
    tenant = Tenant(id=new_id(TENANT_ID_PREFIX), name=name, created_at=utcnow(), disabled=False)
    session.add(tenant)
    audit(session, actor_of(principal), tenant.id, "tenant.created", name=name)
    try:
        await session.flush()
    except IntegrityError as exc:  # a concurrent create of the same name
        raise Conflict(f"tenant {name!r} already exists", param="name") from exc
    return tenant


async def list_tenants(session: AsyncSession, principal: Principal | None) -> list[Tenant]:
    """All tenants for an admin; only its own for anyone else."""
    query = select(Tenant).order_by(Tenant.created_at)
    if principal is not None and not principal.is_admin:
        query = query.where(Tenant.id == principal.tenant_id)
    return list((await session.scalars(query)).all())


async def find_tenant(session: AsyncSession, ref: str) -> Tenant | None:
    """The tenant whose id or name is `ref`, whoever asks."""
    # An id wins over a name (a tenant named like another's id predates the rule against it).
    query = select(Tenant).where((Tenant.id == ref) | (Tenant.name == ref))
    return await session.scalar(query.order_by(case((Tenant.id == ref, 0), else_=1)).limit(1))


async def get_tenant(session: AsyncSession, principal: Principal | None, ref: str) -> Tenant:
    """A tenant by id or name, if the caller may see it."""
    tenant = await find_tenant(session, ref)
    if tenant is None or (principal is not None and not principal.can_act_for(tenant.id)):
        raise NotFound(f"no tenant {ref!r}; list them with `soma tenants list`", param="tenant")
    return tenant


async def update_tenant(
    session: AsyncSession,
    principal: Principal | None,
    ref: str,
    *,
    require_mfa: bool | None = None,
    disabled: bool | None = None,
) -> Tenant:
    """Change a tenant's security settings; only operators disable tenants."""
    tenant = await get_tenant(session, principal, ref)
    if disabled is not None and principal is not None:
        _require_admin(principal)
    changes: dict[str, object] = {}
    if require_mfa is not None and require_mfa != tenant.require_mfa:
        tenant.require_mfa = require_mfa
        changes["require_mfa"] = require_mfa
    if disabled is not None and disabled != tenant.disabled:
        tenant.disabled = disabled
        changes["disabled"] = disabled
        await bump_revocation_epoch(session)  # key caches must notice a disabled tenant
    if changes:
        audit(session, actor_of(principal), tenant.id, "tenant.updated", **changes)
        await session.flush()
    return tenant


async def act_for_tenant(session: AsyncSession, principal: Principal, ref: str | None) -> Principal:
    """The caller acting on tenant `ref` (id or name): admins may name any tenant, others only their own."""
    if ref is None:
        return principal
    tenant = await get_tenant(session, principal, ref)
    return replace(principal, tenant_id=tenant.id, tenant_name=tenant.name)


async def create_key(
    session: AsyncSession,
    principal: Principal | None,
    secret: bytes,
    tenant_ref: str,
    name: str,
    scope: str = "tenant",
    capabilities: list[str] | None = None,
    role: str | None = None,
) -> CreatedKey:
    """Create an API key for a tenant. Only operators create admin keys or keys for other tenants, and
    nobody creates a key with a capability they do not hold themselves."""
    if scope not in KEY_SCOPES:
        raise InvalidRequest(f"scope must be one of {KEY_SCOPES}, not {scope!r}", param="scope")
    if not name or len(name) > 64:
        raise InvalidRequest("key name must be 1-64 characters", param="name")
    tenant = await get_tenant(session, principal, tenant_ref)
    if principal is not None and scope == "admin":
        _require_admin(principal)
    key_role, granted = _key_grant(principal, scope, role, capabilities)
    plaintext = generate_key()
    key = ApiKey(
        id=new_id("key"),
        tenant_id=tenant.id,
        name=name,
        prefix=visible_prefix(plaintext),
        key_hash=hash_key(secret, plaintext),
        scope=scope,
        capabilities=" ".join(sorted(granted)),
        role=key_role,
        created_by=actor_of(principal),
        created_at=utcnow(),
    )
    session.add(key)
    audit(
        session,
        actor_of(principal),
        tenant.id,
        "api_key.created",
        key_id=key.id,
        name=name,
        scope=scope,
        role=key_role,
        capabilities=sorted(granted),
    )
    await session.flush()
    return CreatedKey(key=key, secret=plaintext)


async def list_keys(
    session: AsyncSession, principal: Principal | None, tenant_ref: str | None
) -> list[ApiKey]:
    """Keys of one tenant (default: the caller's); admins may list any tenant's or, with None, all."""
    query = select(ApiKey).order_by(ApiKey.created_at)
    if tenant_ref is not None:
        tenant = await get_tenant(session, principal, tenant_ref)
        query = query.where(ApiKey.tenant_id == tenant.id)
    elif principal is not None and not principal.is_admin:
        query = query.where(ApiKey.tenant_id == principal.tenant_id)
    return list((await session.scalars(query)).all())


async def revoke_key(session: AsyncSession, principal: Principal | None, key_ref: str) -> ApiKey:
    """Revoke a key by id or visible prefix; effective at once here and within a poll on other replicas."""
    query = select(ApiKey).where((ApiKey.id == key_ref) | (ApiKey.prefix == key_ref))
    if principal is not None and not principal.is_admin:
        query = query.where(ApiKey.tenant_id == principal.tenant_id)
    keys = list((await session.scalars(query)).all())
    if not keys:
        raise NotFound(f"no API key {key_ref!r}; list them with `soma keys list`", param="key")
    if len(keys) > 1:
        raise InvalidRequest(f"{key_ref!r} matches {len(keys)} keys; use the key id", param="key")
    key = keys[0]
    if key.scope == "admin" and principal is not None and not principal.is_admin:
        raise Forbidden("only an operator may revoke an admin key")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        await bump_revocation_epoch(session)
        audit(session, actor_of(principal), key.tenant_id, "api_key.revoked", key_id=key.id)
    await session.flush()
    return key


async def revoke_keys_created_by(session: AsyncSession, subject: str, actor: str) -> int:
    """Revoke the live keys `subject` created (a demoted or disabled user's keys must not outlive it)."""
    keys = list(
        (
            await session.scalars(
                select(ApiKey).where(ApiKey.created_by == subject, ApiKey.revoked_at.is_(None))
            )
        ).all()
    )
    now = utcnow()
    for key in keys:
        key.revoked_at = now
        audit(session, actor, key.tenant_id, "api_key.revoked", key_id=key.id, reason="creator_changed")
    if keys:
        await bump_revocation_epoch(session)
    return len(keys)


async def bump_revocation_epoch(session: AsyncSession) -> None:
    """Tell every replica's key cache to forget what it knows."""
    changed = await session.execute(update(RevocationEpoch).values(value=RevocationEpoch.value + 1))
    if not changed.rowcount:  # type: ignore[attr-defined]
        session.add(RevocationEpoch(id=1, value=1))


async def revocation_epoch(session: AsyncSession) -> int:
    """The current revocation counter."""
    return (await session.scalar(select(RevocationEpoch.value))) or 0


async def touch_keys(session: AsyncSession, last_used: dict[str, datetime]) -> None:
    """Record when keys were last used (batched by the authenticator)."""
    for key_id, when in last_used.items():
        await session.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=when))


async def person_behind(session: AsyncSession, tenant_id: str, subject: str) -> str | None:
    """The user (`user:<id>`) a credential acts for: a user themself, or whoever made the API key (and
    the key that made it, and so on); None when no person is behind it (the CLI, an operator key)."""
    seen: set[str] = set()
    while subject.startswith("key:") and subject not in seen:
        seen.add(subject)
        creator = await session.scalar(
            select(ApiKey.created_by).where(
                ApiKey.id == subject[len("key:") :], ApiKey.tenant_id == tenant_id
            )
        )
        if creator is None:
            return None
        subject = creator
    return subject if subject.startswith("user:") else None


def actor_of(principal: Principal | None) -> str:
    """Who an audit event names: the caller's subject, or "cli" for the local operator."""
    return principal.subject if principal is not None else "cli"
