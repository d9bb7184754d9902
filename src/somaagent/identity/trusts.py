"""Trusted OIDC issuers: which external identity providers a tenant accepts, and how their claims map
to roles. Operators only, every change audited; `identity/federation.py` verifies the tokens.

Owns the `trusted_issuers` rows. May import core, db, events and identity; never api or cli.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.core.clock import utcnow
from somaagent.core.errors import Conflict, Forbidden, InvalidRequest, NotFound
from somaagent.core.ids import new_id
from somaagent.core.principal import Principal
from somaagent.events.outbox import audit
from somaagent.identity.capabilities import ROLES
from somaagent.identity.service import actor_of, get_tenant
from somaagent.identity.tables import TrustedIssuer

CLAIM_NAME = re.compile(r"^[A-Za-z0-9_.:/#@-]{1,64}$")
MAX_ROLE_MAP = 100


def _require_operator(principal: Principal | None) -> None:
    if principal is not None and not principal.is_admin:
        raise Forbidden("only an operator may manage trusted OIDC issuers (an admin key, or the `soma` CLI)")


def url_problem(url: str) -> str | None:
    """Why `url` cannot name an identity provider, or None: https, or http only for a loopback host."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return "it is not a valid URL"
    host = parts.hostname or ""
    if not host:
        return "it has no host"
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        return "it must not carry credentials, a query or a fragment"
    if parts.scheme == "https" or (parts.scheme == "http" and _is_loopback(host)):
        return None
    return "it must use https (http is allowed only for a loopback host such as 127.0.0.1)"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _validate_trust(
    issuer: str,
    audience: str,
    subject_claim: str,
    role_claim: str,
    role_map: dict[str, str],
    default_role: str | None,
) -> None:
    problem = url_problem(issuer) if len(issuer) <= 512 else "it is longer than 512 characters"
    if problem is not None:
        raise InvalidRequest(f"issuer {issuer!r} is not usable: {problem}", param="issuer")
    if not audience or len(audience) > 255 or audience != audience.strip():
        raise InvalidRequest("audience must be 1-255 characters without surrounding spaces", param="audience")
    for param, claim in (("subject_claim", subject_claim), ("role_claim", role_claim)):
        if not CLAIM_NAME.match(claim):
            raise InvalidRequest(
                f"{param} {claim!r} is not a claim name: use 1-64 letters, digits or _ . : / # @ -",
                param=param,
            )
    if len(role_map) > MAX_ROLE_MAP:
        raise InvalidRequest(f"role_map may map at most {MAX_ROLE_MAP} values", param="role_map")
    for value, role in role_map.items():
        if not value or len(value) > 255:
            raise InvalidRequest("role_map values must be 1-255 characters", param="role_map")
        if role not in ROLES:
            raise InvalidRequest(
                f"role_map maps {value!r} to unknown role {role!r}; roles are {', '.join(ROLES)}",
                param="role_map",
            )
    if default_role is not None and default_role not in ROLES:
        raise InvalidRequest(
            f"unknown default_role {default_role!r}; roles are {', '.join(ROLES)} (or none, to refuse "
            "tokens whose claims map to no role)",
            param="default_role",
        )


async def trust_issuer(
    session: AsyncSession,
    principal: Principal | None,
    tenant_ref: str,
    *,
    issuer: str,
    audience: str,
    role_claim: str,
    role_map: dict[str, str],
    default_role: str | None,
    subject_claim: str = "sub",
) -> TrustedIssuer:
    """Make tenant `tenant_ref` accept access tokens of `issuer` for `audience` (operators only)."""
    _require_operator(principal)
    _validate_trust(issuer, audience, subject_claim, role_claim, role_map, default_role)
    tenant = await get_tenant(session, principal, tenant_ref)
    duplicate = f"issuer {issuer!r} with audience {audience!r} is already trusted (by this or another tenant)"
    taken = await session.scalar(
        select(TrustedIssuer.id).where(TrustedIssuer.issuer == issuer, TrustedIssuer.audience == audience)
    )
    if taken is not None:
        raise Conflict(duplicate, param="audience")
    trust = TrustedIssuer(
        id=new_id("oidc"),
        tenant_id=tenant.id,
        issuer=issuer,
        audience=audience,
        subject_claim=subject_claim,
        role_claim=role_claim,
        role_map=dict(role_map),
        default_role=default_role,
        created_at=utcnow(),
    )
    session.add(trust)
    audit(
        session,
        actor_of(principal),
        tenant.id,
        "oidc.trusted",
        trust_id=trust.id,
        issuer=issuer,
        audience=audience,
        subject_claim=subject_claim,
        role_claim=role_claim,
        role_map=dict(role_map),
        default_role=default_role,
    )
    try:
        await session.flush()
    except IntegrityError as exc:  # a concurrent trust of the same pair
        raise Conflict(duplicate, param="audience") from exc
    return trust


async def list_trusted_issuers(
    session: AsyncSession, principal: Principal | None, tenant_ref: str
) -> list[TrustedIssuer]:
    """The issuers tenant `tenant_ref` trusts (operators only)."""
    _require_operator(principal)
    tenant = await get_tenant(session, principal, tenant_ref)
    query = (
        select(TrustedIssuer).where(TrustedIssuer.tenant_id == tenant.id).order_by(TrustedIssuer.created_at)
    )
    return list((await session.scalars(query)).all())


async def untrust_issuer(
    session: AsyncSession, principal: Principal | None, tenant_ref: str, issuer_id: str
) -> TrustedIssuer:
    """Stop tenant `tenant_ref` accepting an issuer's tokens (operators only; other replicas follow within
    the verifier's trust cache time)."""
    _require_operator(principal)
    tenant = await get_tenant(session, principal, tenant_ref)
    trust = await session.scalar(
        select(TrustedIssuer).where(TrustedIssuer.id == issuer_id, TrustedIssuer.tenant_id == tenant.id)
    )
    if trust is None:
        raise NotFound(
            f"tenant {tenant.name!r} trusts no issuer {issuer_id!r}; list them with "
            f"GET /v1/tenants/{tenant.name}/oidc-issuers",
            param="issuer_id",
        )
    await session.delete(trust)
    audit(
        session,
        actor_of(principal),
        tenant.id,
        "oidc.untrusted",
        trust_id=trust.id,
        issuer=trust.issuer,
        audience=trust.audience,
    )
    await session.flush()
    return trust
