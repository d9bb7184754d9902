"""`/v1/prices`: the platform's price book (`billing:read` to read; only operators set prices)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from somaagent.api.deps import BillingReadDep, OperatorDep, ServicesDep, SessionDep
from somaagent.api.openai.docs import error_responses
from somaagent.core.clock import utcnow
from somaagent.core.errors import NotFound
from somaagent.core.pagination import ListOut
from somaagent.policy.prices import MAX_MICROS, Price, in_force

router = APIRouter(prefix="/v1/prices", tags=["Governance"])


class PriceIn(BaseModel):
    """A model's (or a tool's, as `tool:<name>`) new price: a new version; earlier versions stay for the
    ledger."""

    model_config = ConfigDict(extra="forbid")

    prompt_micros_per_mtok: int = Field(
        default=0, ge=0, le=MAX_MICROS, description="Micro-USD per million prompt tokens (1 USD = 1000000)."
    )
    completion_micros_per_mtok: int = Field(
        default=0, ge=0, le=MAX_MICROS, description="Micro-USD per million completion tokens."
    )
    cached_micros_per_mtok: int | None = Field(
        default=None,
        ge=0,
        le=MAX_MICROS,
        description="Micro-USD per million cached prompt tokens (default: the prompt price).",
    )
    call_micros: int = Field(
        default=0,
        ge=0,
        le=MAX_MICROS,
        description="Micro-USD per successful call (the only price of a tool).",
    )
    effective_from: datetime | None = Field(
        default=None,
        description="RFC 3339 time this version takes effect (default now; may be in the future; never "
        "before the previous version's).",
    )


class PriceOut(BaseModel):
    """One version of a price."""

    object: Literal["model.price"] = "model.price"
    model: str
    version: int
    prompt_micros_per_mtok: int
    completion_micros_per_mtok: int
    cached_micros_per_mtok: int
    call_micros: int
    effective_from: datetime
    in_force: bool = Field(description="Whether this is the version in force now.")
    created_at: datetime
    created_by: str

    @classmethod
    def of(cls, price: Price, current: Price | None) -> PriceOut:
        return cls(
            model=price.model,
            version=price.version,
            prompt_micros_per_mtok=price.prompt_micros_per_mtok,
            completion_micros_per_mtok=price.completion_micros_per_mtok,
            cached_micros_per_mtok=price.cached_rate,
            call_micros=price.call_micros,
            effective_from=price.in_force_from,
            in_force=current is not None and current.version == price.version,
            created_at=price.created_at,
            created_by=price.created_by,
        )


@router.get("", response_model=ListOut[PriceOut], responses=error_responses(401))
async def list_prices(
    _principal: BillingReadDep, services: ServicesDep, session: SessionDep
) -> ListOut[PriceOut]:
    """The price in force of every priced model and tool."""
    return ListOut(data=[PriceOut.of(p, p) for p in await services.prices.list_prices(session)])


async def _versions(services: ServicesDep, session: SessionDep, model: str) -> ListOut[PriceOut]:
    versions = await services.prices.versions(session, model)
    if not versions:
        raise NotFound(
            f"model {model!r} has no price; an operator sets one with PUT /v1/prices/{model}", param="model"
        )
    current = in_force(versions, utcnow())
    return ListOut(data=[PriceOut.of(p, current) for p in versions])


@router.get("/{model:path}/versions", response_model=ListOut[PriceOut], responses=error_responses(401, 404))
async def list_price_versions(
    model: str, _principal: BillingReadDep, services: ServicesDep, session: SessionDep
) -> ListOut[PriceOut]:
    """Every version of one model's price, newest first (scheduled versions included)."""
    return await _versions(services, session, model)


@router.get("/{model:path}", response_model=ListOut[PriceOut], responses=error_responses(401, 404))
async def price_versions(
    model: str, _principal: BillingReadDep, services: ServicesDep, session: SessionDep
) -> ListOut[PriceOut]:
    """Every version of one model's price, newest first (same as `/v1/prices/{model}/versions`)."""
    return await _versions(services, session, model)


@router.put("/{model:path}", response_model=PriceOut, responses=error_responses(400, 401, 403, 404, 409))
async def set_price(
    model: str, body: PriceIn, principal: OperatorDep, services: ServicesDep, session: SessionDep
) -> PriceOut:
    """Set a model's price from now (or from `effective_from`) on; ids with `/` are fine
    (`/v1/prices/org/model`); a tool's price is `PUT /v1/prices/tool:<name>` with `call_micros`."""
    price = await services.prices.set_price(
        session,
        principal,
        model,
        body.prompt_micros_per_mtok,
        body.completion_micros_per_mtok,
        cached_micros_per_mtok=body.cached_micros_per_mtok,
        call_micros=body.call_micros,
        effective_from=body.effective_from,
    )
    await session.commit()
    services.prices.invalidate(model)
    services.relay.poke()
    return PriceOut.of(price, in_force([price], utcnow()))
