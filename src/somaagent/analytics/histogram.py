"""The fixed log-scale duration histogram the rollups keep in integer columns, and percentiles from it.

Owns: the bucket layout (`BUCKETS`, `bucket_of`, `bucket_bounds`, `column_name`) and `percentile`.
May import: stdlib. Never: the database (tables and queries read the layout from here).

Bucket 0 holds durations under 1 ms; bucket i (1 ≤ i < BUCKETS - 1) holds [2^(i-1), 2^i) ms; the last
bucket holds everything from 2^(BUCKETS-2) ms (about 17.5 minutes) up. A percentile read from it is
therefore within one bucket (a factor of two) of the true value.
"""

from __future__ import annotations

from collections.abc import Sequence

BUCKETS = 22


def column_name(index: int) -> str:
    """The rollup column of bucket `index` (`h00` … `h21`)."""
    return f"h{index:02d}"


COLUMNS: tuple[str, ...] = tuple(column_name(i) for i in range(BUCKETS))


def bucket_of(duration_ms: float) -> int:
    """The bucket a duration in milliseconds falls in (negative durations count as 0)."""
    whole = int(duration_ms) if duration_ms > 0 else 0
    return min(BUCKETS - 1, whole.bit_length())


def bucket_bounds(index: int) -> tuple[float, float | None]:
    """[lower, upper) of bucket `index` in ms; the last bucket has no upper bound."""
    if index == 0:
        return 0.0, 1.0
    lower = float(2 ** (index - 1))
    return lower, None if index == BUCKETS - 1 else float(2**index)


def percentile(counts: Sequence[int], q: float) -> float | None:
    """The q-quantile (0 < q ≤ 1) of the durations counted in `counts`, interpolated linearly inside
    its bucket; None when nothing was counted."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total  # the rank-th smallest duration, 1-based and fractional
    seen = 0
    for index, count in enumerate(counts):
        if count <= 0:
            continue
        if seen + count >= rank:
            lower, upper = bucket_bounds(index)
            if upper is None:
                return lower
            return lower + (upper - lower) * max(0.0, rank - seen) / count
        seen += count
    lower, _ = bucket_bounds(len(counts) - 1)
    return lower
