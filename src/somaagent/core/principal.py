"""Who is calling: the result of authentication, passed explicitly to every service function."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: a tenant, a subject inside it, and its scope."""

    tenant_id: str
    tenant_name: str
    subject: str  # "key:<key id>" for API keys
    key_id: str | None
    is_admin: bool

    def can_act_for(self, tenant_id: str) -> bool:
        """Admins act for any tenant; everyone else only for their own."""
        return self.is_admin or tenant_id == self.tenant_id
