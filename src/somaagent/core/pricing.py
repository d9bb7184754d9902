"""What the consumers that put a price on usage (billing, analytics) ask and are told, so both price an
event the same way through one adapter of the price book (api/composition.py).

Owns: `PriceRequest`, `Charge`. May import: stdlib. Never: a price book (each domain's port, a
`Pricing` protocol of its own, is implemented by the app factory).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class PriceRequest:
    """What to price: `price_name` (a model id, or `tool:<name>`) at `occurred_at`, for these tokens
    (`cached_tokens` are part of `prompt_tokens`) and `calls` calls at the per-call price."""

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
