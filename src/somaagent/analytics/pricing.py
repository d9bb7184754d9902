"""The port analytics prices spend through: what a model call or a tool call cost when it happened.
The app factory adapts the platform's price book to it (analytics never imports policy), with the same
adapter as billing's, so the dashboards' spend and the ledger agree.

Owns: `Pricing`. May import: core, sqlalchemy. Never: policy, api.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.core.pricing import Charge, PriceRequest


class Pricing(Protocol):
    """Prices many items at once through the consumer's session; None for an item nothing priced then."""

    async def charges(self, session: AsyncSession, items: Sequence[PriceRequest]) -> list[Charge | None]: ...
