"""API schemas for usage."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class UsageRowOut(BaseModel):
    object: Literal["usage.bucket"] = "usage.bucket"
    tenant_id: str
    day: str
    model: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    avg_latency_ms: float


class UsageOut(BaseModel):
    object: Literal["list"] = "list"
    tenant_id: str
    data: list[UsageRowOut]
