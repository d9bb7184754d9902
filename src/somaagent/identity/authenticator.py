"""Bearer credential → `Principal`: API keys (with an in-process cache that revocations invalidate),
SomaAgent's own access tokens, and access tokens of OIDC providers a tenant trusts."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.core.clock import utcnow
from somaagent.core.errors import Unauthenticated
from somaagent.core.principal import Principal
from somaagent.identity.federation import FederationVerifier
from somaagent.identity.keys import KEY_PREFIX, hash_key, looks_like_key
from somaagent.identity.service import key_capabilities, revocation_epoch, touch_keys
from somaagent.identity.tables import ApiKey, Tenant
from somaagent.identity.tokens import TokenService, looks_like_jwt, unverified_issuer

log = logging.getLogger(__name__)

MAX_CACHED = 100_000


class KeyAuthenticator:
    """Authenticates API keys. Cache hits cost one HMAC and a dict lookup; a revocation in this
    process drops the cache at once, and other processes notice the revocation epoch within
    `poll_s`. Last-used times are written in batches, not on every request."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        secret: bytes,
        ttl_s: float,
        poll_s: float,
        last_used_flush_s: float = 10.0,
    ) -> None:
        self._sessions = sessions
        self._secret = secret
        self._ttl_s = ttl_s
        self._poll_s = poll_s
        self._last_used_flush_s = last_used_flush_s
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._last_used: dict[str, datetime] = {}
        self._epoch = -1
        self._tasks: list[asyncio.Task[None]] = []

    async def authenticate_key(self, token: str) -> Principal:
        """The principal of an API key, or `Unauthenticated`."""
        if not looks_like_key(token):
            raise Unauthenticated("malformed API key: expected `Authorization: Bearer sk-soma-...`")
        digest = hash_key(self._secret, token)
        cached = self._cache.get(digest)
        now = time.monotonic()
        if cached is not None and cached[1] > now:
            principal = cached[0]
        else:
            principal = await self._lookup(digest)
            if len(self._cache) >= MAX_CACHED:
                self._cache.clear()
            self._cache[digest] = (principal, now + self._ttl_s)
        if principal.key_id is not None:
            self._last_used[principal.key_id] = utcnow()
        return principal

    async def _lookup(self, digest: str) -> Principal:
        async with self._sessions() as session:
            row = (
                await session.execute(
                    select(
                        ApiKey.id,
                        ApiKey.scope,
                        ApiKey.capabilities,
                        ApiKey.role,
                        ApiKey.revoked_at,
                        Tenant.id,
                        Tenant.name,
                        Tenant.disabled,
                    )
                    .join(Tenant, Tenant.id == ApiKey.tenant_id)
                    .where(ApiKey.key_hash == digest)
                )
            ).first()
        if row is None:
            raise Unauthenticated("invalid API key")
        key_id, scope, capabilities, role, revoked_at, tenant_id, tenant_name, disabled = row
        if revoked_at is not None:
            raise Unauthenticated("this API key has been revoked; create a new one with `soma keys create`")
        if disabled:
            raise Unauthenticated(f"tenant {tenant_name!r} is disabled")
        return Principal(
            tenant_id=tenant_id,
            tenant_name=tenant_name,
            subject=f"key:{key_id}",
            key_id=key_id,
            capabilities=key_capabilities(scope, capabilities),
            role=role,
        )

    def invalidate(self) -> None:
        """Forget every cached key (called after a revocation in this process)."""
        self._cache.clear()

    def start(self) -> None:
        """Begin polling the revocation epoch and flushing last-used times."""
        self._tasks = [
            asyncio.create_task(self._poll_revocations(), name="key-revocations"),
            asyncio.create_task(self._flush_last_used_loop(), name="key-last-used"),
        ]

    async def close(self) -> None:
        """Stop background work, keeping the last-used times gathered so far."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.flush_last_used()

    async def _poll_revocations(self) -> None:
        while True:
            try:
                async with self._sessions() as session:
                    epoch = await revocation_epoch(session)
                if epoch != self._epoch:
                    self._cache.clear()
                    self._epoch = epoch
            except Exception as exc:  # a database blip must not kill the poller
                log.warning("revocation poll failed: %s", exc)
            await asyncio.sleep(self._poll_s)

    async def _flush_last_used_loop(self) -> None:
        while True:
            await asyncio.sleep(self._last_used_flush_s)
            try:
                await self.flush_last_used()
            except Exception as exc:
                log.warning("last-used flush failed: %s", exc)

    async def flush_last_used(self) -> None:
        """Write the gathered last-used times."""
        pending, self._last_used = self._last_used, {}
        if pending:
            async with self._sessions() as session, session.begin():
                await touch_keys(session, pending)


class Authenticator:
    """Routes a bearer credential to what can verify it: API keys by their prefix, JWTs by their issuer
    (ours, or an OIDC provider some tenant trusts)."""

    def __init__(
        self, keys: KeyAuthenticator, tokens: TokenService, federation: FederationVerifier, issuer: str
    ) -> None:
        self.keys = keys
        self.tokens = tokens
        self.federation = federation
        self._issuer = issuer

    async def authenticate(self, authorization: str | None) -> Principal:
        """The principal for an `Authorization: Bearer <credential>` header value, or `Unauthenticated`."""
        if not authorization:
            raise Unauthenticated(
                "missing credentials: send `Authorization: Bearer <API key or access token>`; create a key "
                "with `soma keys create --tenant T` or log in with POST /v1/auth/token"
            )
        scheme, _, credential = authorization.partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer":
            raise Unauthenticated("malformed credentials: expected `Authorization: Bearer <credential>`")
        if credential.startswith(KEY_PREFIX):
            return await self.keys.authenticate_key(credential)
        if looks_like_jwt(credential):
            issuer = unverified_issuer(credential)
            if issuer == self._issuer:
                return await self.tokens.verify_access_token(credential)
            federated = await self.federation.verify(credential)
            if federated is not None:
                return federated
            raise Unauthenticated(
                f"no tenant trusts tokens from issuer {str(issuer)[:200]!r}; an operator adds one with "
                "`soma tenants trust-oidc`",
                code="invalid_token",
            )
        raise Unauthenticated(
            "malformed credentials: expected an API key (`sk-soma-...`) or an access token (a JWT)"
        )

    def invalidate(self) -> None:
        """Forget cached API keys (after a revocation in this process)."""
        self.keys.invalidate()

    def start(self) -> None:
        """Begin the key cache's and the token service's background work."""
        self.keys.start()
        self.tokens.start()

    async def close(self) -> None:
        """Stop background work."""
        await self.keys.close()
        await self.tokens.close()
        await self.federation.close()
