"""API schemas of usage and analytics (pydantic, at the HTTP edge only)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field


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


# Analytics (`/v1/analytics/…`).


class CountersOut(BaseModel):
    requests: int = Field(description="Model calls (chat and embeddings).")
    tokens: int = Field(description="Prompt + completion tokens of those calls.")
    runs: int = Field(description="Agent runs that ended (completed, failed or cancelled).")
    tool_calls: int
    policy_decisions: int


class LiveOut(BaseModel):
    last_5_minutes: CountersOut
    today: CountersOut = Field(description="Since 00:00 UTC.")


class WindowsOut(BaseModel):
    last_hour: float | None = Field(description="The trailing 60 minutes; null without model calls.")
    today: float | None = Field(description="Since 00:00 UTC; null without model calls.")


class LatencyOut(BaseModel):
    p50_ms: float | None
    p95_ms: float | None


class LatencyWindowsOut(BaseModel):
    last_hour: LatencyOut
    today: LatencyOut


class BudgetUseOut(BaseModel):
    id: str
    scope: str
    scope_id: str
    unit: str = Field(description="`usd` (amounts in micro-USD) or `tokens`.")
    period: str
    limit: int
    spent: int
    reserved: int
    remaining: int
    used: float | None = Field(description="(spent + reserved) / limit; null for a limit of 0.")
    resets_at: datetime | None


class SpendOut(BaseModel):
    today_micros: int = Field(description="Model and tool calls since 00:00 UTC at the prices in force.")
    today_usd: str
    unpriced_model_calls_today: int = Field(
        description="Model calls no price was in force for (not in the spend; set one with PUT /v1/prices)."
    )
    budgets: list[BudgetUseOut]


class TopOut(BaseModel):
    name: str = Field(description="Model, persona or tool (an empty persona: runs without one).")
    count: int = Field(description="Calls, or runs.")
    errors: int = Field(description="Failed calls, or failed runs.")
    tokens: int
    cost_micros: int
    p95_ms: float | None


class TopsOut(BaseModel):
    models: list[TopOut]
    personas: list[TopOut]
    tools: list[TopOut]


class AnomalyOut(BaseModel):
    object: Literal["analytics.anomaly"] = "analytics.anomaly"
    id: str
    tenant_id: str
    metric: str = Field(description="`spend` (micro-USD per hour), `error_rate` (0-1) or `p95_latency` (ms).")
    hour: datetime = Field(description="The start of the hour that was flagged (UTC).")
    value: float
    baseline_mean: float
    baseline_std: float = Field(description="The standard deviation used (never below the floor).")
    z: float
    samples: int = Field(description="Hours in the baseline when it was compared.")
    severity: str
    notification_id: str
    detected_at: datetime


class DashboardOut(BaseModel):
    object: Literal["analytics.dashboard"] = "analytics.dashboard"
    tenant_id: str
    generated_at: datetime
    live: LiveOut
    error_rate: WindowsOut = Field(description="Failed model calls / model calls.")
    latency: LatencyWindowsOut = Field(description="Of model calls, from the log-scale histograms.")
    spend: SpendOut
    top: TopsOut = Field(description="Today's five busiest models, personas and tools.")
    anomalies: list[AnomalyOut] = Field(description="Open anomalies: flagged hours of the last 24 hours.")


class RollupRowOut(BaseModel):
    group: dict[str, str] = Field(description="The values of the `group_by` dimensions.")
    count: int = Field(description="Requests, runs, tool calls or policy decisions.")
    errors: int = Field(description="Failed requests, failed runs, failed tool calls or denials.")
    error_rate: float | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_micros: int = Field(description="Model and tool kinds; 0 for runs and policy.")
    cost_usd: str
    unpriced: int
    avg_ms: float | None = Field(description="Mean latency or duration; null for policy decisions.")
    p50_ms: float | None
    p95_ms: float | None


class RollupsOut(BaseModel):
    object: Literal["analytics.rollups"] = "analytics.rollups"
    tenant_id: str
    kind: str
    group_by: list[str]
    since: datetime
    until: datetime
    data: list[RollupRowOut]
