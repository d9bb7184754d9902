"""The training-mode lock: while a tenant trains, its normal inference is refused (423, naming the
holder); the holder's own calls go through and each is audited."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.core.clock import utcnow
from somaagent.core.errors import Conflict, Locked, NotFound
from somaagent.core.principal import Principal
from somaagent.events.outbox import BufferedEmitter, audit
from somaagent.events.schemas import AUDIT_EVENTS, Event
from somaagent.identity.tables import TrainingLock


@dataclass(frozen=True, slots=True)
class LockState:
    """A tenant's training lock as callers see it."""

    tenant_id: str
    holder: str
    reason: str
    started_at: datetime


def _state(row: TrainingLock) -> LockState:
    return LockState(row.tenant_id, row.holder, row.reason, row.started_at)


async def get_lock(session: AsyncSession, tenant_id: str) -> LockState | None:
    """The tenant's lock, or None."""
    row = await session.get(TrainingLock, tenant_id)
    return _state(row) if row is not None else None


async def start_training(
    session: AsyncSession, principal: Principal, tenant_id: str, reason: str
) -> LockState:
    """Take the lock for `principal` (idempotent for the holder); 409 naming the holder if another has it."""
    current = await session.get(TrainingLock, tenant_id)
    if current is not None:
        if current.holder == principal.subject:
            return _state(current)
        raise Conflict(
            f"tenant is already in training mode, held by {current.holder} since "
            f"{current.started_at.isoformat()}",
            code="training_lock_held",
        )
    row = TrainingLock(tenant_id=tenant_id, holder=principal.subject, reason=reason, started_at=utcnow())
    session.add(row)
    audit(session, principal.subject, tenant_id, "training.started", reason=reason)
    try:
        await session.flush()
    except IntegrityError as exc:  # another replica took it between our read and insert
        raise Conflict("tenant is already in training mode", code="training_lock_held") from exc
    return _state(row)


async def stop_training(session: AsyncSession, principal: Principal, tenant_id: str) -> LockState:
    """Release the lock. The holder, or an operator, may release it."""
    current = await session.get(TrainingLock, tenant_id)
    if current is None:
        raise NotFound("this tenant is not in training mode", code="training_not_active")
    if current.holder != principal.subject and not principal.is_admin:
        raise Conflict(
            f"the training lock is held by {current.holder}; only they or an operator may stop it",
            code="training_lock_held",
        )
    state = _state(current)
    await session.execute(delete(TrainingLock).where(TrainingLock.tenant_id == tenant_id))
    audit(session, principal.subject, tenant_id, "training.stopped", holder=state.holder)
    return state


class TrainingLocks:
    """Answers "may this caller run inference now?" from a cache each entry of which lives `ttl_s`, so
    a lock taken on another replica applies within that time; changes made here apply at once."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], emitter: BufferedEmitter, ttl_s: float):
        self._sessions = sessions
        self._emitter = emitter
        self._ttl_s = ttl_s
        self._cache: dict[str, tuple[LockState | None, float]] = {}

    def invalidate(self, tenant_id: str) -> None:
        """Forget what is cached for a tenant (after a start or stop here)."""
        self._cache.pop(tenant_id, None)

    async def admit_inference(self, principal: Principal) -> None:
        """Raise `Locked` naming the holder unless the tenant is unlocked or `principal` holds the lock."""
        lock = await self._current(principal.tenant_id)
        if lock is None:
            return
        if lock.holder != principal.subject:
            raise Locked(
                f"tenant {principal.tenant_name!r} is in training mode (held by {lock.holder} since "
                f"{lock.started_at.isoformat()}); inference resumes after POST /v1/training/stop",
                code="tenant_in_training",
            )
        self._emitter.emit(
            Event(
                topic=AUDIT_EVENTS,
                type="training.call",
                tenant_id=principal.tenant_id,
                actor=principal.subject,
                data={"reason": lock.reason},
            )
        )

    async def _current(self, tenant_id: str) -> LockState | None:
        cached = self._cache.get(tenant_id)
        now = time.monotonic()
        if cached is not None and cached[1] > now:
            return cached[0]
        async with self._sessions() as session:
            row = await session.scalar(select(TrainingLock).where(TrainingLock.tenant_id == tenant_id))
            state = _state(row) if row is not None else None
        self._cache[tenant_id] = (state, now + self._ttl_s)
        return state
