"""Identifiers: sortable, prefixed, URL-safe."""

from __future__ import annotations

import os
import time


def new_id(prefix: str) -> str:
    """A time-ordered id like `ten_0190f3c2a1b2c3d4e5f6a7b8c9d0`: 48-bit ms clock + 80 random bits, hex."""
    millis = time.time_ns() // 1_000_000
    return f"{prefix}_{millis:012x}{os.urandom(10).hex()}"


def new_request_id() -> str:
    """A request id for logs, `x-request-id` and idempotent usage events."""
    return new_id("req")
