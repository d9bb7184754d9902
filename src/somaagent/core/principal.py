"""Who is calling: the result of authentication, passed explicitly to every service function."""

from __future__ import annotations

from dataclasses import dataclass

# The capability that lets a caller act across tenants (`identity/capabilities.py` lists them all).
OPERATOR = "tenants:admin"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: a tenant, a subject inside it, and what it may do."""

    tenant_id: str
    tenant_name: str
    subject: str  # "key:<key id>", "user:<user id>", "oidc:<issuer id>:<sub>", "cli"
    key_id: str | None
    capabilities: frozenset[str]
    user_id: str | None = None
    role: str | None = None  # a user's role; None for API keys and the CLI
    token_id: str | None = None  # the access token's `jti`, when authenticated by a token
    login_id: str | None = None  # the token's login (refresh-token family), so logout can end all of it

    @property
    def is_admin(self) -> bool:
        """The operator: may act for any tenant."""
        return OPERATOR in self.capabilities

    def can(self, capability: str) -> bool:
        """Whether the caller holds `capability`."""
        return capability in self.capabilities

    def can_act_for(self, tenant_id: str) -> bool:
        """Operators act for any tenant; everyone else only for their own."""
        return self.is_admin or tenant_id == self.tenant_id
