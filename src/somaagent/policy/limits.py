"""Rate-limit settings: what the rpm, tpm and concurrency limits of a tenant, a user and a key are.

Owns: `RateLimits` (CRUD on `rate_limits`, scoped by tenant; resolution for a principal from a cache).
May import: core, db, events, policy. Never: counts requests (`policy/ratelimit.py` does), or checks that
a user or key id exists (the API layer does, with identity's tables).

Resolution, per scope of the caller (tenant, user, key): that scope's row if it has one (None fields:
unlimited there), else `Settings.rate_limit_defaults[scope]`, else unlimited. A replica trusts its copy
of a tenant's rows for `ttl_s`; changes made through this object apply in this process at once.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.core.clock import utcnow
from somaagent.core.errors import InvalidRequest, NotFound
from somaagent.core.principal import Principal
from somaagent.events.outbox import audit
from somaagent.policy.ratelimit import SCOPES, ScopeLimits
from somaagent.policy.tables import RateLimitSetting

_KINDS = ("rpm", "tpm", "concurrent")


@dataclass(frozen=True, slots=True)
class RateLimitRow:
    """One scope's stored limits."""

    tenant_id: str
    scope: str
    scope_id: str
    rpm: int | None
    tpm: int | None
    concurrent: int | None
    updated_at: datetime


def _row(setting: RateLimitSetting) -> RateLimitRow:
    return RateLimitRow(
        setting.tenant_id,
        setting.scope,
        setting.scope_id,
        setting.rpm,
        setting.tpm,
        setting.concurrent,
        setting.updated_at,
    )


def principal_scopes(principal: Principal) -> list[tuple[str, str]]:
    """(scope, scope id) of every scope a caller is in: its tenant, its user and its key when it has them."""
    scopes = [("tenant", principal.tenant_id)]
    if principal.user_id:
        scopes.append(("user", principal.user_id))
    if principal.key_id:
        scopes.append(("key", principal.key_id))
    return scopes


def check_scope(scope: str) -> None:
    """Raise `InvalidRequest` unless `scope` is tenant, user or key."""
    if scope not in SCOPES:
        raise InvalidRequest(
            f"unknown scope {scope!r}; a limit applies to one of: {', '.join(SCOPES)}", param="scope"
        )


class RateLimits:
    """Rate-limit settings of every tenant, and the limits that apply to a caller (cached)."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        defaults: Mapping[str, Mapping[str, int]],
        ttl_s: float,
    ) -> None:
        self._sessions = sessions
        self._ttl_s = ttl_s
        self._defaults = {
            scope: ScopeLimits(scope, "", values.get("rpm"), values.get("tpm"), values.get("concurrent"))
            for scope, values in defaults.items()
        }
        unknown = set(defaults) - set(SCOPES) | {k for v in defaults.values() for k in v if k not in _KINDS}
        if unknown:
            raise ValueError(
                f"SOMA_RATE_LIMIT_DEFAULTS: unknown names {sorted(unknown)}; scopes are {list(SCOPES)}, "
                f"limits are {list(_KINDS)}"
            )
        self._cache: dict[str, tuple[dict[tuple[str, str], RateLimitRow], float]] = {}

    @property
    def defaults(self) -> dict[str, ScopeLimits]:
        """The limits of scopes that have no row of their own, by scope."""
        return dict(self._defaults)

    def invalidate(self, tenant_id: str) -> None:
        """Forget the cached rows of a tenant (after a change here)."""
        self._cache.pop(tenant_id, None)

    async def for_principal(self, principal: Principal) -> list[ScopeLimits]:
        """The limits of each of the caller's scopes that has any (tenant first, then user, then key)."""
        rows = await self._rows(principal.tenant_id)
        limits = []
        for scope, scope_id in principal_scopes(principal):
            row = rows.get((scope, scope_id))
            if row is not None:
                found = ScopeLimits(scope, scope_id, row.rpm, row.tpm, row.concurrent)
            elif scope in self._defaults:
                default = self._defaults[scope]
                found = ScopeLimits(scope, scope_id, default.rpm, default.tpm, default.concurrent)
            else:
                continue
            if found.windowed or found.concurrent is not None:
                limits.append(found)
        return limits

    async def set(
        self,
        session: AsyncSession,
        principal: Principal,
        scope: str,
        scope_id: str,
        rpm: int | None,
        tpm: int | None,
        concurrent: int | None,
    ) -> RateLimitRow:
        """Create or replace the limits of one scope of the caller's tenant (None: unlimited there)."""
        check_scope(scope)
        for name, value in (("rpm", rpm), ("tpm", tpm), ("concurrent", concurrent)):
            if value is not None and value < 1:
                raise InvalidRequest(
                    f"{name} must be at least 1 (got {value}); send null for no limit", param=name
                )
        setting = await session.get(RateLimitSetting, (principal.tenant_id, scope, scope_id))
        if setting is None:
            setting = RateLimitSetting(tenant_id=principal.tenant_id, scope=scope, scope_id=scope_id)
            session.add(setting)
        setting.rpm, setting.tpm, setting.concurrent = rpm, tpm, concurrent
        setting.updated_at = utcnow()
        await session.flush()
        self._audit(
            session, principal, "rate_limit.set", scope, scope_id, rpm=rpm, tpm=tpm, concurrent=concurrent
        )
        self.invalidate(principal.tenant_id)
        return _row(setting)

    async def get(
        self, session: AsyncSession, principal: Principal, scope: str, scope_id: str
    ) -> RateLimitRow:
        """The stored limits of one scope of the caller's tenant; 404 if it has none."""
        check_scope(scope)
        setting = await session.get(RateLimitSetting, (principal.tenant_id, scope, scope_id))
        if setting is None:
            raise NotFound(
                f"no rate limits are set for {scope} {scope_id}; defaults apply (GET /v1/rate-limits lists "
                f"them), set some with PUT /v1/rate-limits/{scope}/{scope_id}",
                code="rate_limit_not_found",
            )
        return _row(setting)

    async def list(self, session: AsyncSession, principal: Principal) -> list[RateLimitRow]:
        """Every stored limit of the caller's tenant, tenant first, then users, then keys."""
        settings = await session.scalars(
            select(RateLimitSetting)
            .where(RateLimitSetting.tenant_id == principal.tenant_id)
            .order_by(RateLimitSetting.scope, RateLimitSetting.scope_id)
        )
        order: dict[str, int] = {scope: i for i, scope in enumerate(SCOPES)}
        return sorted((_row(s) for s in settings), key=lambda r: (order.get(r.scope, 9), r.scope_id))

    async def delete(
        self, session: AsyncSession, principal: Principal, scope: str, scope_id: str
    ) -> RateLimitRow:
        """Remove one scope's limits (the defaults apply to it again); 404 if it has none."""
        row = await self.get(session, principal, scope, scope_id)
        await session.execute(
            delete(RateLimitSetting).where(
                RateLimitSetting.tenant_id == principal.tenant_id,
                RateLimitSetting.scope == scope,
                RateLimitSetting.scope_id == scope_id,
            )
        )
        self._audit(session, principal, "rate_limit.deleted", scope, scope_id)
        self.invalidate(principal.tenant_id)
        return row

    async def _rows(self, tenant_id: str) -> dict[tuple[str, str], RateLimitRow]:
        cached = self._cache.get(tenant_id)
        now = time.monotonic()
        if cached is not None and cached[1] > now:
            return cached[0]
        async with self._sessions() as session:
            settings = await session.scalars(
                select(RateLimitSetting).where(RateLimitSetting.tenant_id == tenant_id)
            )
            rows = {(s.scope, s.scope_id): _row(s) for s in settings}
        self._cache[tenant_id] = (rows, now + self._ttl_s)
        return rows

    @staticmethod
    def _audit(
        session: AsyncSession, principal: Principal, action: str, scope: str, scope_id: str, **data: object
    ) -> None:
        audit(
            session,
            principal.subject,
            principal.tenant_id,
            action,
            scope=scope,
            scope_id=scope_id,
            **data,
        )
