"""The port analytics prices spend through: what a model call or a tool call cost when it happened.
The app factory adapts the platform's price book to it (analytics never imports policy).

Owns: `CostRequest`, `Pricing`. May import: stdlib, sqlalchemy. Never: policy, api.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession


@dataclass(frozen=True, slots=True)
class CostRequest:
    """What to price: `price_name` (a model id, or `tool:<name>`) at `occurred_at`, these tokens
    (`cached_tokens` are part of `prompt_tokens`) and `calls` calls at the per-call price."""

    price_name: str
    occurred_at: datetime
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    calls: int


class Pricing(Protocol):
    """Micro-USD of each item, read through the consumer's session; None where no price was in force."""

    async def costs(self, session: AsyncSession, items: Sequence[CostRequest]) -> list[int | None]: ...
