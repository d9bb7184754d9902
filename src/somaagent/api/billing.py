"""The billing component the app factory builds (the `billing` consumer group, priced through the
platform's price book) and its routes: `/v1/billing/…` and `/v1/exports/billing-ledger`."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import APIRouter

from somaagent.api import billing_ledger, billing_reports
from somaagent.api.composition import Check, Platform, PriceBookPricing
from somaagent.billing.consumer import GROUP, TOPICS, BillingConsumer
from somaagent.events.consumers import ConsumerSpec

router = APIRouter()
router.include_router(billing_ledger.router)
router.include_router(billing_reports.router)


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
