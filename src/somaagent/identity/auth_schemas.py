"""API schemas of logging in and of users (table models are not API schemas)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from somaagent.identity.tables import User


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


GrantType = Literal["password", "refresh_token", "client_credentials", "urn:somaagent:grant-type:mfa-otp"]


class TokenRequest(_Strict):
    """`POST /v1/auth/token`, form-encoded (RFC 6749) or JSON; the grant decides which fields it needs."""

    grant_type: GrantType
    tenant: str | None = Field(default=None, max_length=64, description="password grant: tenant name or id")
    username: str | None = Field(default=None, max_length=128)
    password: str | None = Field(default=None, max_length=1024)
    otp: str | None = Field(default=None, max_length=32, description="A TOTP code or a recovery code")
    mfa_token: str | None = Field(default=None, max_length=4096)
    refresh_token: str | None = Field(default=None, max_length=256)
    client_id: str | None = Field(default=None, max_length=64)
    client_secret: str | None = Field(default=None, max_length=256)
    scope: str | None = Field(
        default=None, max_length=1024, description="Ignored: tokens carry the role's capabilities"
    )


class TokenResponse(BaseModel):
    access_token: str
    token_type: Literal["Bearer"] = "Bearer"  # noqa: S105  (the RFC 6750 scheme name)
    expires_in: int
    refresh_token: str | None = None
    scope: str


class RevokeRequest(_Strict):
    """Revoke an access token of your tenant (`token`), every token of a `user`, or (operators) a `jti`."""

    token: str | None = Field(default=None, max_length=8192)
    user: str | None = Field(default=None, max_length=128, description="User id or username")
    jti: str | None = Field(default=None, max_length=64)


class RevokedOut(BaseModel):
    object: Literal["revocation"] = "revocation"
    revoked: Literal["token", "user", "jti", "login"]


class UserCreate(_Strict):
    tenant: str | None = Field(default=None, description="Tenant id or name; default: yours.")
    username: str = Field(min_length=1, max_length=128, examples=["ada@example.com"])
    role: Literal["owner", "admin", "member", "viewer"] = "member"
    kind: Literal["human", "service"] = "human"
    password: str | None = Field(default=None, max_length=256)


class UserPatch(_Strict):
    role: Literal["owner", "admin", "member", "viewer"] | None = None
    disabled: bool | None = None


class PasswordChange(_Strict):
    current_password: str = Field(max_length=256)
    new_password: str = Field(max_length=256)


class UserOut(BaseModel):
    object: Literal["user"] = "user"
    id: str
    tenant_id: str
    username: str
    kind: str
    role: str
    disabled: bool
    mfa_enabled: bool
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, user: User) -> UserOut:
        return cls(
            id=user.id,
            tenant_id=user.tenant_id,
            username=user.username,
            kind=user.kind,
            role=user.role,
            disabled=user.disabled,
            mfa_enabled=user.totp_confirmed_at is not None,
            created_at=user.created_at,
            updated_at=user.updated_at,
        )


class UserCreated(UserOut):
    client_id: str | None = Field(default=None, description="Service accounts: the client_id (the user id).")
    client_secret: str | None = Field(default=None, description="Service accounts: shown once; store it now.")


class UnlockOut(BaseModel):
    object: Literal["unlock"] = "unlock"
    user_id: str
    was_locked: bool


class TenantPatch(_Strict):
    require_mfa: bool | None = None
    disabled: bool | None = None
