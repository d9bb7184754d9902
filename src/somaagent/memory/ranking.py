"""How recalled memories are ranked: similarity first, recency as a tie-breaker that fades.

    score = (1 - w) * similarity + w * 0.5 ** (age_days / half_life_days)

`similarity` is the cosine similarity of the query and the memory (-1..1), `age_days` counts from the
memory's last update, `w` is `recency_weight` (default 0.1) and `half_life_days` defaults to 30: a
memory updated today gains up to 0.1 over an equally similar one from a month ago (0.05).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class Ranking:
    """The ranking's two knobs."""

    recency_weight: float = 0.1
    half_life_days: float = 30.0

    def score(self, similarity: float, updated_at: datetime, now: datetime) -> float:
        """The combined score of one memory."""
        age_days = max(0.0, (now - updated_at).total_seconds() / 86_400)
        recency: float = 0.5 ** (age_days / self.half_life_days)
        return (1 - self.recency_weight) * similarity + self.recency_weight * recency
