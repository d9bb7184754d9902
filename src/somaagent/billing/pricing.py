"""The port billing prices through: for each billable item, the price version in force when it happened
and what it costs. The app factory adapts the platform's price book to it (billing never imports policy).

Owns: `ChargeRequest`, `Charge`, `Pricing`. May import: stdlib, sqlalchemy. Never: policy, api.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession


@dataclass(frozen=True, slots=True)
class ChargeRequest:
    """What to price: `price_name` (a model id, or `tool:<name>`) at `occurred_at`, for these tokens
    (`cached_tokens` are part of `prompt_tokens`) and `calls` calls charged the per-call price."""

    price_name: str
    occurred_at: datetime
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    calls: int


@dataclass(frozen=True, slots=True)
class Charge:
    """A priced item: the price version used and the amount in micro-USD."""

    price_version: int
    amount_micros: int


class Pricing(Protocol):
    """Prices many items at once through the consumer's session; None for an item nothing priced then."""

    async def charges(self, session: AsyncSession, items: Sequence[ChargeRequest]) -> list[Charge | None]: ...
