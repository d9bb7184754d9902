"""Capabilities (what a caller may do) and the roles that bundle them.

A route names the one capability it needs (`api/deps.py`); users get theirs from their role; API keys act
as a role too (their rank) and carry a subset of its capabilities. Nobody grants a capability they do not
hold or a role above their own.
"""

from __future__ import annotations

from enum import StrEnum


class Capability(StrEnum):
    """Every capability SomaAgent checks. The value is what tokens and keys carry."""

    CHAT_USE = "chat:use"  # models, completions, embeddings, sessions, personas (read)
    MEMORY_READ = "memory:read"
    MEMORY_WRITE = "memory:write"
    TOOLS_EXECUTE = "tools:execute"  # list and invoke tools, call MCP tools
    TOOLS_ADMIN = "tools:admin"  # tool settings, MCP server registration
    TOOLS_APPROVE = "tools:approve"  # decide human approvals
    AGENTS_ADMIN = "agents:admin"  # personas
    MODELS_ADMIN = "models:admin"  # model profiles
    POLICY_ADMIN = "policy:admin"
    BILLING_READ = "billing:read"  # usage, the ledger, summaries, exports, invoices
    ANALYTICS_READ = "analytics:read"  # the dashboard and anomalies
    NOTIFICATIONS_READ = "notifications:read"  # one's backlog, live push and preferences
    NOTIFICATIONS_SEND = "notifications:send"  # queue notifications to a tenant's people and webhooks
    AUDIT_READ = "audit:read"
    USERS_ADMIN = "users:admin"  # users, service accounts, MFA resets, lockouts
    KEYS_ADMIN = "keys:admin"  # the tenant's API keys
    TRAINING_ADMIN = "training:admin"  # the training-mode lock
    ACCOUNT_SELF = "account:self"  # a user's own profile, password and MFA (user tokens only)
    TENANTS_ADMIN = "tenants:admin"  # the operator: every tenant, tenant creation, federation, host commands


ROLES = ("owner", "admin", "member", "viewer")

_VIEWER = frozenset(
    {
        Capability.CHAT_USE,
        Capability.MEMORY_READ,
        Capability.BILLING_READ,
        Capability.ANALYTICS_READ,
        Capability.NOTIFICATIONS_READ,
    }
)
_MEMBER = _VIEWER | {Capability.MEMORY_WRITE, Capability.TOOLS_EXECUTE}
_ADMIN = _MEMBER | {
    Capability.TOOLS_ADMIN,
    Capability.TOOLS_APPROVE,
    Capability.AGENTS_ADMIN,
    Capability.MODELS_ADMIN,
    Capability.POLICY_ADMIN,
    Capability.AUDIT_READ,
    Capability.USERS_ADMIN,
    Capability.KEYS_ADMIN,
    Capability.TRAINING_ADMIN,
    Capability.NOTIFICATIONS_SEND,
}
# Owners differ from admins in whom they may appoint (see `may_assign_role`), not in capabilities.
_OWNER = _ADMIN

ROLE_CAPABILITIES: dict[str, frozenset[str]] = {
    "owner": frozenset(_OWNER),
    "admin": frozenset(_ADMIN),
    "member": frozenset(_MEMBER),
    "viewer": frozenset(_VIEWER),
}

# Everything inside one tenant (what an owner-role key may hold).
TENANT_CAPABILITIES: frozenset[str] = frozenset(_OWNER)
# A new tenant key acts as this role unless it names another: enough for an OpenAI client, no management.
DEFAULT_KEY_ROLE = "member"
# The operator (admin API keys, the local CLI): every capability, across tenants.
OPERATOR_CAPABILITIES: frozenset[str] = frozenset(Capability) - {Capability.ACCOUNT_SELF}

ROLE_RANK = {"viewer": 0, "member": 1, "admin": 2, "owner": 3}  # who outranks whom


def capabilities_of_role(role: str) -> frozenset[str]:
    """The capabilities a user with `role` holds (every human user may also manage their own account)."""
    return ROLE_CAPABILITIES[role] | {Capability.ACCOUNT_SELF}


def parse_capabilities(values: list[str] | tuple[str, ...]) -> frozenset[str]:
    """Validate capability names; unknown names raise ValueError naming the first one."""
    known = {c.value for c in Capability}
    for value in values:
        if value not in known:
            raise ValueError(f"unknown capability {value!r}; known: {', '.join(sorted(known))}")
    return frozenset(values)


def may_assign_role(assigner_role: str | None, role: str) -> bool:
    """Whether a non-operator whose role (a user's, or a key's rank) is `assigner_role` may give or manage
    `role`. Operators are checked before this; a non-operator without a role may assign nothing."""
    if assigner_role is None:
        return False
    return ROLE_RANK[assigner_role] >= ROLE_RANK[role] and (assigner_role == "owner" or role != "owner")
