"""Identity tables: tenants, API keys, users and their second factors, tokens and their revocations,
signing keys, trusted OIDC issuers, login throttling and the training lock."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from somaagent.db.base import Base, TenantMixin, UTCDateTime


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    # Users of this tenant must have a second factor before they get anything but account:self.
    require_mfa: Mapped[bool] = mapped_column(Boolean, default=False)


class ApiKey(TenantMixin, Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    # First characters of the key, shown in listings so people can tell keys apart.
    prefix: Mapped[str] = mapped_column(String(24))
    # HMAC-SHA256(secret_key, key) in hex: a database leak does not leak usable keys.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scope: Mapped[str] = mapped_column(String(16))  # "admin" | "tenant"
    # Space-separated capabilities (identity/capabilities.py): a subset of the role's and of its creator's.
    capabilities: Mapped[str] = mapped_column(Text, default="")
    # Tenant keys act with a role's rank (whom they may appoint); None for admin keys (the operator).
    role: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # The Principal.subject that created it ("cli" for the CLI): its keys end when a user is demoted.
    created_by: Mapped[str] = mapped_column(String(255), default="cli")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class RevocationEpoch(Base):
    """A counter bumped on every revocation; replicas poll it to drop their key caches."""

    __tablename__ = "revocation_epoch"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[int] = mapped_column(Integer, default=0)


class User(TenantMixin, Base):
    """A person (`kind="human"`, logs in with a password) or a service account (client credentials)."""

    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("tenant_id", "username", name="uq_users_tenant_username"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id"), index=True)
    username: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))  # "human" | "service"
    role: Mapped[str] = mapped_column(String(16))  # identity/capabilities.py ROLES
    # argon2id of the password (humans) or of the client secret (service accounts).
    secret_hash: Mapped[str] = mapped_column(String(255))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # TOTP secret sealed with the server secret (identity/secret_box.py); set at enrollment.
    totp_secret: Mapped[str | None] = mapped_column(Text, nullable=True)
    totp_confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # The last accepted TOTP time step: a code of this step or an earlier one is a replay.
    totp_last_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class RecoveryCode(Base):
    """A single-use MFA recovery code, stored as a keyed hash."""

    __tablename__ = "recovery_codes"

    user_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    code_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class RefreshToken(TenantMixin, Base):
    """One refresh token of a login's rotating family. Using a token twice revokes the family."""

    __tablename__ = "refresh_tokens"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id"), index=True)
    user_id: Mapped[str] = mapped_column(String(40), ForeignKey("users.id", ondelete="CASCADE"), index=True)
    family_id: Mapped[str] = mapped_column(String(40), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    amr: Mapped[list[str]] = mapped_column(JSON)  # how the login authenticated: ["pwd"], ["pwd", "otp"]
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class RevokedToken(Base):
    """A revocation every replica applies: a token (`jti`), a login family (`family`), or every token of
    a subject issued before `revoked_at` (`subject`). Replicas read new rows by `seq`."""

    __tablename__ = "revoked_tokens"
    __table_args__ = (Index("ix_revoked_tokens_expires_at", "expires_at"),)

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))  # "jti" | "family" | "subject"
    value: Mapped[str] = mapped_column(String(255))
    revoked_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # After this, the revoked tokens have expired anyway and the row may be pruned.
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


class SigningKey(Base):
    """A token-signing key. Active keys sign; retired keys only verify until `expires_at`, then leave the
    JWKS."""

    __tablename__ = "signing_keys"

    kid: Mapped[str] = mapped_column(String(64), primary_key=True)
    alg: Mapped[str] = mapped_column(String(16))  # "EdDSA" | "RS256"
    private_key: Mapped[str] = mapped_column(Text)  # PKCS#8 PEM sealed with the server secret
    public_jwk: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class TrustedIssuer(TenantMixin, Base):
    """An external OIDC provider whose access tokens a tenant accepts, and how its claims map to roles."""

    __tablename__ = "trusted_issuers"
    __table_args__ = (UniqueConstraint("issuer", "audience", name="uq_trusted_issuers_issuer_audience"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id"), index=True)
    issuer: Mapped[str] = mapped_column(String(512))
    audience: Mapped[str] = mapped_column(String(255))
    subject_claim: Mapped[str] = mapped_column(String(64), default="sub")
    role_claim: Mapped[str] = mapped_column(String(64))
    # External claim value → role; the highest mapped role wins; no match → `default_role` or refused.
    role_map: Mapped[dict[str, str]] = mapped_column(JSON)
    default_role: Mapped[str | None] = mapped_column(String(16), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class LoginAddress(TenantMixin, Base):
    """A client address a user has logged in from: a login from an address not here is news to them."""

    __tablename__ = "login_addresses"

    user_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    address: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id"), index=True)
    first_seen_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime())


class LoginThrottle(Base):
    """Failed logins per account or per client address inside the current window, and any lockout."""

    __tablename__ = "login_throttle"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)  # "account:<tenant>:<name>" | "ip:<addr>"
    failures: Mapped[int] = mapped_column(Integer, default=0)
    window_started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class TrainingLock(Base):
    """A tenant in training mode: normal inference is refused for everyone but the holder."""

    __tablename__ = "training_locks"

    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id"), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))  # the Principal.subject that started it
    reason: Mapped[str] = mapped_column(String(500), default="")
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
