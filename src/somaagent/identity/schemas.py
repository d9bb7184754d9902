"""API schemas for tenants and keys (table models are not API schemas)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from somaagent.identity.service import key_capabilities
from somaagent.identity.tables import ApiKey, Tenant


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TenantCreate(_Strict):
    name: str = Field(min_length=1, max_length=63, examples=["acme"])


class TenantOut(BaseModel):
    object: Literal["tenant"] = "tenant"
    id: str
    name: str
    created_at: datetime
    disabled: bool
    require_mfa: bool

    @classmethod
    def of(cls, tenant: Tenant) -> TenantOut:
        return cls(
            id=tenant.id,
            name=tenant.name,
            created_at=tenant.created_at,
            disabled=tenant.disabled,
            require_mfa=tenant.require_mfa,
        )


class KeyCreate(_Strict):
    tenant: str | None = Field(default=None, description="Tenant id or name; default: the caller's tenant.")
    name: str = Field(min_length=1, max_length=64, examples=["ci"])
    scope: Literal["tenant", "admin"] = "tenant"
    role: Literal["owner", "admin", "member", "viewer"] | None = Field(
        default=None,
        description="The role the key acts as (at most yours); default member. Not for admin keys.",
    )
    capabilities: list[str] | None = Field(
        default=None,
        max_length=32,
        description="What the key may do: a subset of its role's and of yours; default: the role's.",
        examples=[["chat:use", "memory:read"]],
    )


class KeyOut(BaseModel):
    object: Literal["api_key"] = "api_key"
    id: str
    tenant_id: str
    name: str
    prefix: str
    scope: str
    role: str | None
    capabilities: list[str]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def of(cls, key: ApiKey) -> KeyOut:
        return cls(
            id=key.id,
            tenant_id=key.tenant_id,
            name=key.name,
            prefix=key.prefix,
            scope=key.scope,
            role=key.role,
            capabilities=sorted(key_capabilities(key.scope, key.capabilities)),
            created_at=key.created_at,
            last_used_at=key.last_used_at,
            revoked_at=key.revoked_at,
        )


class KeyCreated(KeyOut):
    key: str = Field(description="The secret key. Shown once: store it now.")
