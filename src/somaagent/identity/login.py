"""Logging in: the OAuth2 grants behind `POST /v1/auth/token` (password with an optional second factor,
the MFA step, refresh with rotation and reuse detection, client credentials), and logging out.

Unknown users, wrong passwords, disabled accounts and wrong codes all get the same answer, cost the same
argon2 verification, and count against the same per-account and per-address throttles.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.core.clock import utcnow
from somaagent.core.errors import SomaError, Unauthenticated
from somaagent.core.ids import new_id
from somaagent.core.principal import Principal
from somaagent.events.outbox import audit
from somaagent.identity import mfa
from somaagent.identity.capabilities import ROLE_CAPABILITIES, Capability, capabilities_of_role
from somaagent.identity.login_addresses import note_login_address
from somaagent.identity.passwords import hash_secret, needs_rehash, verify_secret
from somaagent.identity.secret_box import SecretBox
from somaagent.identity.service import find_tenant
from somaagent.identity.tables import RefreshToken, Tenant, User
from somaagent.identity.throttle import (
    ThrottlePolicy,
    account_key,
    address_key,
    clear,
    refusal,
    release,
    reserve_attempt,
)
from somaagent.identity.tokens import TokenService
from somaagent.identity.users import login_throttle_key

T = TypeVar("T")

REFRESH_PREFIX = "rt-soma-"
INVALID_LOGIN = "invalid username or password"

log = logging.getLogger(__name__)


class InvalidGrant(Unauthenticated):
    """The credentials of a grant are wrong (the message never says which part)."""

    code = "invalid_grant"


class MfaRequired(Unauthenticated):
    """The password was right and the account has a second factor: send it with the `mfa_token`."""

    code = "mfa_required"

    def __init__(self, mfa_token: str) -> None:
        super().__init__(
            "this account needs a second factor: POST /v1/auth/token with "
            f"grant_type={MFA_GRANT}, the mfa_token and an otp (or a recovery code)"
        )
        self.extra = {"mfa_token": mfa_token}


MFA_GRANT = "urn:somaagent:grant-type:mfa-otp"


@dataclass(frozen=True, slots=True)
class LoginSettings:
    """How long logins last and how failures are throttled."""

    refresh_ttl_s: float
    access_ttl_s: float
    throttle: ThrottlePolicy


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """What `/v1/auth/token` answers (RFC 6749 §5.1)."""

    access_token: str
    expires_in: int
    refresh_token: str | None
    scope: str


class Logins:
    """The grants, each in its own transaction; failures are committed even though the grant fails."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        tokens: TokenService,
        mfa_box: SecretBox,
        recovery_key: bytes,
        refresh_key: bytes,
        settings: LoginSettings,
        constitution_hash: Callable[[str], Awaitable[str]] | None = None,
    ) -> None:
        self._sessions = sessions
        self._tokens = tokens
        self._mfa_box = mfa_box
        self._recovery_key = recovery_key
        self._refresh_key = refresh_key
        self._settings = settings
        # The hash of a tenant's constitution in force, stamped into its access tokens (injected by the app
        # factory: identity does not import policy).
        self._constitution_hash = constitution_hash

    async def password_grant(
        self, tenant_ref: str, username: str, password: str, otp: str | None, address: str | None
    ) -> TokenGrant:
        """A human user's login; with MFA and no `otp`, raises `MfaRequired` carrying a challenge token."""
        await self._tokens.ensure_signing_key()
        name = username.strip().lower()
        async with self._sessions() as session:
            tenant = await find_tenant(session, tenant_ref)
            user = None
            if tenant is not None:
                user = await session.scalar(
                    select(User).where(
                        User.tenant_id == tenant.id, User.username == name, User.kind == "human"
                    )
                )
            stored_hash = user.secret_hash if user is not None else None
        keys = self._keys(account_key(tenant.id if tenant else tenant_ref, name), address)
        await self._admit(keys)
        # No database connection is held while argon2 runs (~200 ms): logins must not drain the pool.
        matched = await verify_secret(stored_hash, password)
        async with self._sessions() as session:
            tenant = await session.get(Tenant, tenant.id) if tenant is not None else None
            user = await session.get(User, user.id) if user is not None else None
            if not matched or user is None or tenant is None or user.disabled or tenant.disabled:
                await self._fail(session, tenant, user, "password", address)
                raise InvalidGrant(INVALID_LOGIN)
            if needs_rehash(user.secret_hash):
                user.secret_hash = await hash_secret(password)
            amr = ["pwd"]
            if mfa.mfa_enabled(user):
                if otp is None:
                    await session.commit()
                    # The attempt stays counted until the second factor succeeds: otherwise a password
                    # holder could alternate logins and code guesses without ever reaching the limit.
                    raise MfaRequired(
                        await self._tokens.issue_mfa_challenge(user_id=user.id, tenant_id=tenant.id)
                    )
                amr.append(await self._second_factor(session, tenant, user, otp, address))
            return await self._succeed(session, keys, tenant, user, amr, address)

    async def mfa_grant(self, mfa_token: str, otp: str, address: str | None) -> TokenGrant:
        """The second step of an MFA login: the challenge from `MfaRequired` and a code."""
        await self._tokens.ensure_signing_key()
        user_id, tenant_id = await self._tokens.verify_mfa_challenge(mfa_token)
        async with self._sessions() as session:
            user = await session.scalar(select(User).where(User.id == user_id, User.tenant_id == tenant_id))
            if user is None:
                raise InvalidGrant("this MFA challenge is no longer valid; log in again")
            keys = self._keys(account_key(tenant_id, user.username), address)
        await self._admit(keys)
        async with self._sessions() as session:
            tenant = await session.get(Tenant, tenant_id)
            user = await session.get(User, user_id)
            if tenant is None or user is None or user.disabled or tenant.disabled:
                raise InvalidGrant("this MFA challenge is no longer valid; log in again")
            method = await self._second_factor(session, tenant, user, otp, address)
            return await self._succeed(session, keys, tenant, user, ["pwd", method], address)

    async def client_credentials_grant(
        self, client_id: str, client_secret: str, address: str | None
    ) -> TokenGrant:
        """A service account's token (no refresh token: it can always ask again). Only the address is
        throttled: a 256-bit secret gains nothing from an account lockout, which anyone knowing the
        client id could use to cut the service off."""
        await self._tokens.ensure_signing_key()
        async with self._sessions() as session:
            user = await session.scalar(select(User).where(User.id == client_id, User.kind == "service"))
            stored_hash = user.secret_hash if user is not None else None
        keys = [(address_key(address), self._settings.throttle.address_failures)]
        await self._admit(keys)
        matched = await verify_secret(stored_hash, client_secret)
        async with self._sessions() as session:
            user = await session.get(User, user.id) if user is not None else None
            tenant = await session.get(Tenant, user.tenant_id) if user is not None else None
            if not matched or user is None or tenant is None or user.disabled or tenant.disabled:
                await self._fail(session, tenant, user, "client_secret", address)
                raise InvalidGrant("invalid client_id or client_secret", code="invalid_client")
            await release(session, keys[0][0])
            capabilities = ROLE_CAPABILITIES[user.role]
            issued = await self._tokens.issue_access_token(
                user_id=user.id,
                tenant_id=tenant.id,
                tenant_name=tenant.name,
                role=user.role,
                capabilities=capabilities,
                family_id=None,
                amr=[],
                extra_claims=await self._token_claims(tenant.id),
            )
            audit(
                session,
                f"user:{user.id}",
                tenant.id,
                "auth.token_issued",
                user_id=user.id,
                grant="client_credentials",
            )
            await session.commit()
            return TokenGrant(issued.token, issued.expires_in, None, " ".join(sorted(capabilities)))

    async def check_code(self, session: AsyncSession, user: User, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run `attempt` (an action of a logged-in user that checks a code or their password) under the
        account's login throttle: a stolen access token must not buy unlimited guesses either (at the
        code that mints fresh recovery codes, say)."""
        key = login_throttle_key(user)
        await self._admit([(key, self._settings.throttle.account_failures)])
        result = await attempt()
        await clear(session, key)
        return result

    async def refresh_grant(self, refresh_token: str) -> TokenGrant:
        """New tokens for a refresh token. One used twice has leaked: its whole login is revoked."""
        await self._tokens.ensure_signing_key()
        digest = self._digest(refresh_token)
        async with self._sessions() as session:
            row = await session.scalar(select(RefreshToken).where(RefreshToken.token_hash == digest))
            now = utcnow()
            if row is None:
                raise InvalidGrant("unknown refresh token")
            if row.revoked_at is not None:
                raise InvalidGrant("this login was revoked; log in again")
            # Claiming is one conditional UPDATE, so two concurrent uses cannot both win.
            claimed = await session.execute(
                update(RefreshToken)
                .where(RefreshToken.id == row.id, RefreshToken.used_at.is_(None))
                .values(used_at=now)
            )
            if not claimed.rowcount:  # type: ignore[attr-defined]
                await self._revoke_family(session, row.family_id, now)
                audit(
                    session,
                    f"user:{row.user_id}",
                    row.tenant_id,
                    "auth.refresh_reuse_detected",
                    user_id=row.user_id,
                    login_id=row.family_id,
                )
                await session.commit()
                raise InvalidGrant(
                    "this refresh token was already used, so it may have leaked: every token of this login "
                    "is now revoked; log in again"
                )
            if row.expires_at <= now:
                await session.commit()
                raise InvalidGrant("this refresh token has expired; log in again")
            user = await session.get(User, row.user_id)
            tenant = await session.get(Tenant, row.tenant_id)
            if user is None or tenant is None or user.disabled or tenant.disabled:
                await session.commit()
                raise InvalidGrant("this account can no longer log in")
            if mfa.mfa_enabled(user) and not {"otp", "recovery"} & set(row.amr):
                # A login from before the second factor was enrolled (a stolen password, say) ends here.
                await self._revoke_family(session, row.family_id, now)
                await session.commit()
                raise InvalidGrant("this login began before your second factor was enabled; log in again")
            grant = await self._issue(session, tenant, user, list(row.amr), row.family_id)
            await session.commit()
            return grant

    async def logout(self, principal: Principal) -> None:
        """End the caller's login: its access token now, and every token of its refresh family."""
        async with self._sessions() as session:
            now = utcnow()
            if principal.token_id is not None:
                await self._tokens.revoke_token_id(session, principal.token_id, self._access_expiry(now))
            if principal.login_id is not None:
                await self._revoke_family(session, principal.login_id, now)
            audit(session, principal.subject, principal.tenant_id, "auth.logout", login_id=principal.login_id)
            await session.commit()

    async def revoke_token_id(
        self,
        session: AsyncSession,
        actor: Principal,
        tenant_id: str,
        token_id: str,
        login_id: str | None = None,
    ) -> None:
        """Revoke one access token (and its login's refresh family, if known), in the caller's transaction."""
        now = utcnow()
        await self._tokens.revoke_token_id(session, token_id, self._access_expiry(now))
        if login_id is not None:
            await self._revoke_family(session, login_id, now)
        audit(session, actor.subject, tenant_id, "auth.token_revoked", jti=token_id, login_id=login_id)

    async def end_other_logins(self, session: AsyncSession, user: User, keep: str | None) -> None:
        """After a user enrolls a second factor, end every login but the one that enrolled (and proved
        a code), so a session opened with a stolen password does not survive the enrollment."""
        now = utcnow()
        families = await session.scalars(
            select(RefreshToken.family_id)
            .where(RefreshToken.user_id == user.id, RefreshToken.revoked_at.is_(None))
            .distinct()
        )
        for family in list(families):
            if family != keep:
                await self._revoke_family(session, family, now)
        if keep is not None:
            live = await session.scalars(
                select(RefreshToken).where(RefreshToken.family_id == keep, RefreshToken.revoked_at.is_(None))
            )
            for row in live:
                row.amr = sorted({*row.amr, "otp"})

    async def revoke_user_tokens(self, session: AsyncSession, actor: Principal | None, user: User) -> None:
        """Revoke every token of `user` (in the caller's transaction): on disable, role change, MFA reset."""
        await self._tokens.revoke_subject(session, user.id)  # applies in this process at once
        await end_refresh_tokens(session, actor, user)

    async def _second_factor(
        self, session: AsyncSession, tenant: Tenant, user: User, code: str, address: str | None
    ) -> str:
        try:
            return await mfa.verify_second_factor(
                session, self._mfa_box, self._recovery_key, user, code, utcnow().timestamp()
            )
        except Unauthenticated:
            tenant_id, user_id = tenant.id, user.id  # the rollback expires the loaded rows
            await session.rollback()  # the code check may hold SQLite's write lock
            self._audit_failure(session, tenant_id, user_id, "second_factor", address)
            await session.commit()
            raise

    async def _succeed(
        self,
        session: AsyncSession,
        keys: list[tuple[str, int]],
        tenant: Tenant,
        user: User,
        amr: list[str],
        address: str | None,
    ) -> TokenGrant:
        await clear(session, keys[0][0])
        await release(session, keys[1][0])
        grant = await self._issue(session, tenant, user, amr, new_id("lgn"))
        audit(session, f"user:{user.id}", tenant.id, "auth.login_succeeded", user_id=user.id, amr=amr)
        await note_login_address(session, user, address, "+".join(amr))
        await session.commit()
        return grant

    def _keys(self, account: str, address: str | None) -> list[tuple[str, int]]:
        policy = self._settings.throttle
        return [(account, policy.account_failures), (address_key(address), policy.address_failures)]

    async def _admit(self, keys: list[tuple[str, int]]) -> None:
        """Count this attempt against each key, in its own committed transaction, or refuse it (429)."""
        now = utcnow()
        async with self._sessions() as session:
            waits = [
                (key, await reserve_attempt(session, self._settings.throttle, key, limit, now))
                for key, limit in keys
            ]
            await session.commit()
        for key, wait_s in waits:
            if wait_s is not None:
                raise refusal(key, wait_s)

    async def _issue(
        self, session: AsyncSession, tenant: Tenant, user: User, amr: list[str], family: str
    ) -> TokenGrant:
        capabilities = capabilities_of_role(user.role)
        if tenant.require_mfa and not mfa.mfa_enabled(user):
            # Until they enroll, they may only manage their own account (and so enroll).
            capabilities = frozenset({Capability.ACCOUNT_SELF.value})
        issued = await self._tokens.issue_access_token(
            user_id=user.id,
            tenant_id=tenant.id,
            tenant_name=tenant.name,
            role=user.role,
            capabilities=capabilities,
            family_id=family,
            amr=amr,
            extra_claims=await self._token_claims(tenant.id),
        )
        refresh = REFRESH_PREFIX + secrets.token_urlsafe(32)
        now = utcnow()
        session.add(
            RefreshToken(
                id=new_id("rtk"),
                tenant_id=tenant.id,
                user_id=user.id,
                family_id=family,
                token_hash=self._digest(refresh),
                amr=amr,
                issued_at=now,
                expires_at=now + timedelta(seconds=self._settings.refresh_ttl_s),
            )
        )
        return TokenGrant(issued.token, issued.expires_in, refresh, " ".join(sorted(capabilities)))

    async def _token_claims(self, tenant_id: str) -> dict[str, object] | None:
        if self._constitution_hash is None:
            return None
        try:
            return {"constitution_hash": await self._constitution_hash(tenant_id)}
        except SomaError as exc:  # a broken constitution must not lock out the admins who would mend it
            log.warning("token for tenant %s issued without constitution_hash: %s", tenant_id, exc.message)
            return None

    async def _fail(
        self,
        session: AsyncSession,
        tenant: Tenant | None,
        user: User | None,
        factor: str,
        address: str | None,
    ) -> None:
        """Record a failed attempt (already counted by `_admit`) in the audit log."""
        if tenant is not None:
            self._audit_failure(session, tenant.id, user.id if user else None, factor, address)
        await session.commit()

    def _audit_failure(
        self, session: AsyncSession, tenant_id: str, user_id: str | None, factor: str, address: str | None
    ) -> None:
        audit(
            session,
            f"user:{user_id}" if user_id else "anonymous",
            tenant_id,
            "auth.login_failed",
            user_id=user_id,
            factor=factor,
            address=address or "unknown",
        )

    async def _revoke_family(self, session: AsyncSession, family: str, now: datetime) -> None:
        await session.execute(
            update(RefreshToken)
            .where(RefreshToken.family_id == family, RefreshToken.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        await self._tokens.revoke_family(session, family, self._access_expiry(now))

    def _access_expiry(self, now: datetime) -> datetime:
        # Revocations can be forgotten once every token they cover has expired on its own.
        return now + timedelta(seconds=self._settings.access_ttl_s + 60)

    def _digest(self, refresh_token: str) -> str:
        return hmac.new(self._refresh_key, refresh_token.encode(), hashlib.sha256).hexdigest()


async def end_refresh_tokens(session: AsyncSession, actor: Principal | None, user: User) -> None:
    """Revoke a user's refresh tokens and record it (access tokens are revoked by subject beside this)."""
    await session.execute(
        update(RefreshToken)
        .where(RefreshToken.user_id == user.id, RefreshToken.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    audit(session, actor.subject if actor else "cli", user.tenant_id, "auth.tokens_revoked", user_id=user.id)
