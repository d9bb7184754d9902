"""`/v1/prices`: the platform's price book (`billing:read` to read; only operators set prices)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from somaagent.api.deps import BillingReadDep, OperatorDep, ServicesDep, SessionDep
from somaagent.api.openai.docs import error_responses
from somaagent.core.errors import NotFound
from somaagent.core.pagination import ListOut
from somaagent.policy.prices import Price

router = APIRouter(prefix="/v1/prices", tags=["Governance"])


class PriceIn(BaseModel):
    """A model's new price (it becomes a new version; earlier versions stay for the ledger)."""

    model_config = ConfigDict(extra="forbid")

    prompt_micros_per_mtok: int = Field(
        ge=0, le=2**53, description="Micro-USD per million prompt tokens (1 USD = 1000000)."
    )
    completion_micros_per_mtok: int = Field(
        ge=0, le=2**53, description="Micro-USD per million completion tokens."
    )


class PriceOut(BaseModel):
    """One version of a model's price."""

    object: Literal["model.price"] = "model.price"
    model: str
    version: int
    prompt_micros_per_mtok: int
    completion_micros_per_mtok: int
    created_at: datetime
    created_by: str

    @classmethod
    def of(cls, price: Price) -> PriceOut:
        return cls(
            model=price.model,
            version=price.version,
            prompt_micros_per_mtok=price.prompt_micros_per_mtok,
            completion_micros_per_mtok=price.completion_micros_per_mtok,
            created_at=price.created_at,
            created_by=price.created_by,
        )


@router.get("", response_model=ListOut[PriceOut], responses=error_responses(401))
async def list_prices(
    _principal: BillingReadDep, services: ServicesDep, session: SessionDep
) -> ListOut[PriceOut]:
    """The price in force of every priced model."""
    return ListOut(data=[PriceOut.of(p) for p in await services.prices.list_prices(session)])


@router.get("/{model:path}", response_model=ListOut[PriceOut], responses=error_responses(401, 404))
async def price_versions(
    model: str, _principal: BillingReadDep, services: ServicesDep, session: SessionDep
) -> ListOut[PriceOut]:
    """Every version of one model's price, newest (in force) first."""
    versions = await services.prices.versions(session, model)
    if not versions:
        raise NotFound(f"model {model!r} has no price; an operator sets one with PUT /v1/prices/{model}")
    return ListOut(data=[PriceOut.of(p) for p in versions])


@router.put("/{model:path}", response_model=PriceOut, responses=error_responses(400, 401, 403, 404, 409))
async def set_price(
    model: str, body: PriceIn, principal: OperatorDep, services: ServicesDep, session: SessionDep
) -> PriceOut:
    """Set a model's price from now on (ids with `/` are fine: `/v1/prices/org/model`)."""
    price = await services.prices.set_price(
        session, principal, model, body.prompt_micros_per_mtok, body.completion_micros_per_mtok
    )
    await session.commit()
    services.prices.invalidate(model)
    services.relay.poke()
    return PriceOut.of(price)
