"""The port billing prices through: for each billable item, the price version in force when it happened
and what it costs. The app factory adapts the platform's price book to it (billing never imports policy).

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
