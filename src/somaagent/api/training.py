"""`/v1/training`: start, stop and read a tenant's training-mode lock (`training:admin`; operators for any
tenant, others their own). While locked, the tenant's inference answers 423 to all but the holder."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from somaagent.api.deps import ServicesDep, SessionDep, TrainingAdminDep
from somaagent.api.openai.docs import error_responses
from somaagent.api.services import Services
from somaagent.identity.service import act_for_tenant, get_tenant
from somaagent.identity.training import LockState, get_lock, start_training, stop_training

router = APIRouter(prefix="/v1/training", tags=["Training"])


class TrainingStart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str | None = Field(
        default=None, max_length=63, description="Tenant id or name; default: the caller's tenant."
    )
    reason: str = Field(min_length=1, max_length=500, examples=["fine-tuning run 2025-03"])


class TrainingStop(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str | None = Field(
        default=None, max_length=63, description="Tenant id or name; default: the caller's tenant."
    )


class TrainingLockOut(BaseModel):
    """A tenant's training state: `active` with the lock's fields, or inactive with them null."""

    object: Literal["training_lock"] = "training_lock"
    tenant_id: str
    active: bool
    holder: str | None = Field(description="The credential that took the lock (`key:…`, `user:…`).")
    reason: str | None
    started_at: datetime | None

    @classmethod
    def of(cls, tenant_id: str, lock: LockState | None) -> TrainingLockOut:
        if lock is None:
            return cls(tenant_id=tenant_id, active=False, holder=None, reason=None, started_at=None)
        return cls(
            tenant_id=tenant_id,
            active=True,
            holder=lock.holder,
            reason=lock.reason,
            started_at=lock.started_at,
        )


def _applied(services: Services, tenant_id: str) -> None:
    # This replica applies the change at once; others within `SOMA_TRAINING_LOCK_TTL_S`.
    services.training.invalidate(tenant_id)
    services.relay.poke()  # the audit event, without waiting for the relay's next poll


@router.post(
    "/start",
    response_model=TrainingLockOut,
    status_code=201,
    responses=error_responses(400, 401, 403, 404, 409),
)
async def start(
    body: TrainingStart, principal: TrainingAdminDep, services: ServicesDep, session: SessionDep
) -> TrainingLockOut:
    """Lock the tenant for training: its inference is refused (423) for everyone but the caller."""
    acting = await act_for_tenant(session, principal, body.tenant)
    lock = await start_training(session, acting, acting.tenant_id, body.reason)
    await session.commit()
    _applied(services, acting.tenant_id)
    return TrainingLockOut.of(acting.tenant_id, lock)


@router.post("/stop", response_model=TrainingLockOut, responses=error_responses(400, 401, 403, 404, 409))
async def stop(
    principal: TrainingAdminDep, services: ServicesDep, session: SessionDep, body: TrainingStop | None = None
) -> TrainingLockOut:
    """Release the lock (the holder or an operator); answers the tenant's state after, inactive."""
    acting = await act_for_tenant(session, principal, body.tenant if body is not None else None)
    await stop_training(session, acting, acting.tenant_id)
    await session.commit()
    _applied(services, acting.tenant_id)
    return TrainingLockOut.of(acting.tenant_id, None)


@router.get("/{tenant}", response_model=TrainingLockOut, responses=error_responses(401, 403, 404))
async def read(tenant: str, principal: TrainingAdminDep, session: SessionDep) -> TrainingLockOut:
    """The tenant's training state (id or name)."""
    found = await get_tenant(session, principal, tenant)
    return TrainingLockOut.of(found.id, await get_lock(session, found.id))
