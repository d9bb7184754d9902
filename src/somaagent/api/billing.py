"""The billing component the app factory builds (the `billing` consumer group, priced through the
platform's price book) and its routes: `/v1/billing/…` and `/v1/exports/billing-ledger`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from fastapi import APIRouter
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.api import billing_ledger, billing_reports
from somaagent.api.composition import Check, Platform
from somaagent.billing.consumer import GROUP, TOPICS, BillingConsumer
from somaagent.billing.pricing import Charge, ChargeRequest
from somaagent.events.consumers import ConsumerSpec
from somaagent.policy.prices import PriceBook, cost_micros, in_force

router = APIRouter()
router.include_router(billing_ledger.router)
router.include_router(billing_reports.router)


class PriceBookPricing:
    """Billing's `Pricing` port over the platform's price book: every version of the batch's models and
    tools, read in the consumer's transaction (never a replica's cache: a price set a moment ago on
    another replica applies to the events after its effective time)."""

    def __init__(self, prices: PriceBook) -> None:
        self._prices = prices

    async def charges(self, session: AsyncSession, items: Sequence[ChargeRequest]) -> list[Charge | None]:
        """The charge of each item at the version in force when it happened; None when none was."""
        versions = await self._prices.versions_of(session, {i.price_name for i in items})
        found: list[Charge | None] = []
        for item in items:
            price = in_force(versions.get(item.price_name, ()), item.occurred_at)
            found.append(
                None
                if price is None
                else Charge(
                    price.version,
                    cost_micros(
                        price, item.prompt_tokens, item.completion_tokens, item.cached_tokens, item.calls
                    ),
                )
            )
        return found


@dataclass
class BillingComponent:
    """What the app factory wires: the `billing` consumer group, readiness checks, a lifecycle."""

    consumers: list[ConsumerSpec] = field(default_factory=list)
    readiness: list[tuple[str, Check]] = field(default_factory=list)

    async def start(self) -> None:
        """Nothing runs in the background: the bus drives the consumer."""

    async def close(self) -> None:
        """Nothing to stop."""


def build_billing(platform: Platform) -> BillingComponent:
    """The billing component of this process."""
    consumer = BillingConsumer(PriceBookPricing(platform.prices))
    # The ledger skips an event it holds (unique source event id) and rolls up only what it inserted.
    return BillingComponent(consumers=[ConsumerSpec(GROUP, TOPICS, consumer, idempotent_writes=True)])
