"""A tenant's policy document, versioned: every change appends a version; the highest one is in force.

Owns: reading and writing `policy_versions` (whole documents and single rules). May import: core, db,
events, policy. Never: api. Callers pass the principal; every query filters on its tenant.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.core.clock import utcnow
from somaagent.core.errors import Conflict, InvalidRequest, NotFound
from somaagent.core.principal import Principal
from somaagent.events.outbox import audit
from somaagent.policy.document import PolicyDocument, Rule, parse_policy
from somaagent.policy.tables import PolicyVersion


@dataclass(frozen=True, slots=True)
class StoredPolicy:
    """One version of a tenant's policy. Version 0 is the built-in default (no rules), never stored."""

    tenant_id: str
    version: int
    document: PolicyDocument
    created_at: datetime | None
    created_by: str | None


async def current_version(session: AsyncSession, tenant_id: str) -> int:
    """The tenant's policy version in force (0: none written yet)."""
    found = await session.scalar(
        select(func.max(PolicyVersion.version)).where(PolicyVersion.tenant_id == tenant_id)
    )
    return int(found or 0)


async def get_policy(session: AsyncSession, tenant_id: str, version: int | None = None) -> StoredPolicy:
    """A version of the tenant's policy (default: the one in force)."""
    wanted = await current_version(session, tenant_id) if version is None else version
    if wanted == 0:
        return StoredPolicy(tenant_id, 0, PolicyDocument(), None, None)
    row = await session.get(PolicyVersion, (tenant_id, wanted))
    if row is None:
        raise NotFound(f"no policy version {wanted}; GET /v1/policy/versions lists them", param="version")
    # Stored documents were validated when written; parse again so the types are the current ones.
    return StoredPolicy(tenant_id, row.version, parse_policy(row.document), row.created_at, row.created_by)


async def list_versions(session: AsyncSession, tenant_id: str) -> list[StoredPolicy]:
    """Every stored version of the tenant's policy, newest first."""
    rows = (
        await session.scalars(
            select(PolicyVersion)
            .where(PolicyVersion.tenant_id == tenant_id)
            .order_by(PolicyVersion.version.desc())
        )
    ).all()
    return [
        StoredPolicy(r.tenant_id, r.version, parse_policy(r.document), r.created_at, r.created_by)
        for r in rows
    ]


async def put_policy(
    session: AsyncSession,
    principal: Principal,
    raw: dict[str, Any],
    base_version: int | None = None,
    change: str = "policy.updated",
) -> StoredPolicy:
    """Validate and store `raw` as the next version (the caller commits). `base_version`, when given,
    must be the version in force: two admins editing at once cannot silently overwrite each other."""
    document = parse_policy(raw)
    tenant_id = principal.tenant_id
    latest = await current_version(session, tenant_id)
    if base_version is not None and base_version != latest:
        raise Conflict(
            f"the policy is at version {latest}, not {base_version}: reload it and apply your change again",
            code="policy_version_conflict",
        )
    version = latest + 1
    now = utcnow()
    stored = document.model_dump(mode="json", exclude_defaults=False)
    session.add(
        PolicyVersion(
            tenant_id=tenant_id,
            version=version,
            document=stored,
            created_at=now,
            created_by=principal.subject,
        )
    )
    audit(session, principal.subject, tenant_id, change, version=version, rules=len(document.rules))
    try:
        await session.flush()
    except IntegrityError as exc:  # another admin wrote the same version number first
        raise Conflict(
            "the policy changed while this was being saved; reload it and try again",
            code="policy_version_conflict",
        ) from exc
    return StoredPolicy(tenant_id, version, document, now, principal.subject)


async def put_rule(
    session: AsyncSession, principal: Principal, raw_rule: dict[str, Any], replace: str | None = None
) -> tuple[StoredPolicy, Rule]:
    """Add a rule (or replace the rule `replace`) as a new version of the policy."""
    current = await get_policy(session, principal.tenant_id)
    rules = [r.model_dump(mode="json") for r in current.document.rules]
    rule_id = raw_rule.get("id") if isinstance(raw_rule, dict) else None
    if replace is not None:
        index = _index_of(rules, replace)
        if rule_id is None:
            raw_rule = {**raw_rule, "id": replace}
        rules[index] = raw_rule
    else:
        if rule_id is not None and any(r["id"] == rule_id for r in rules):
            raise Conflict(f"a rule {rule_id!r} exists; PUT /v1/policy/rules/{rule_id} replaces it")
        rules.append(raw_rule)
    raw = current.document.model_dump(mode="json")
    raw["rules"] = rules
    stored = await put_policy(
        session, principal, raw, current.version, "policy.rule_replaced" if replace else "policy.rule_added"
    )
    wanted = raw_rule.get("id") if replace is None else (raw_rule.get("id") or replace)
    return stored, next(r for r in stored.document.rules if r.id == wanted)


async def delete_rule(session: AsyncSession, principal: Principal, rule_id: str) -> StoredPolicy:
    """Remove a rule, as a new version of the policy."""
    current = await get_policy(session, principal.tenant_id)
    rules = [r.model_dump(mode="json") for r in current.document.rules]
    del rules[_index_of(rules, rule_id)]
    raw = current.document.model_dump(mode="json")
    raw["rules"] = rules
    return await put_policy(session, principal, raw, current.version, "policy.rule_deleted")


def _index_of(rules: list[dict[str, Any]], rule_id: str) -> int:
    for index, rule in enumerate(rules):
        if rule.get("id") == rule_id:
            return index
    raise NotFound(f"no rule {rule_id!r} in the policy; GET /v1/policy/rules lists them", param="rule_id")


def require_object(value: Any, param: str) -> dict[str, Any]:
    """`value` as a JSON object, or a 400 naming `param`."""
    if not isinstance(value, dict):
        raise InvalidRequest(f"{param} must be a JSON object", param=param)
    return value
