"""Identifiers: sortable, prefixed, URL-safe."""

from __future__ import annotations

import os
import random
import time

# Ids are unique, not secret (keys use `secrets`): a seeded PRNG avoids a getrandom() syscall per id.
_random = random.Random(random.SystemRandom().getrandbits(128))
# A forked child must not repeat its parent's sequence.
os.register_at_fork(after_in_child=lambda: _random.seed(random.SystemRandom().getrandbits(128)))


def new_id(prefix: str) -> str:
    """A time-ordered id like `ten_0190f3c2a1b2c3d4e5f6a7b8c9d0`: 48-bit ms clock + 80 random bits, hex."""
    millis = time.time_ns() // 1_000_000
    return f"{prefix}_{millis:012x}{_random.getrandbits(80):020x}"


def new_request_id() -> str:
    """A request id for logs, `x-request-id` and idempotent usage events."""
    return new_id("req")
