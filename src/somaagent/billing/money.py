"""Amounts as people read them: integer micro-USD to an exact USD decimal string (never via a float)."""

from __future__ import annotations

MICROS_PER_USD = 1_000_000


def usd(micros: int) -> str:
    """`1234567` → `"1.234567"`, `-5` → `"-0.000005"`: exact, six decimals."""
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), MICROS_PER_USD)
    return f"{sign}{whole}.{fraction:06d}"
