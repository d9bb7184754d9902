"""API schemas for model profiles."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from somaagent.models.tables import ModelProfile


class ProfileSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(
        min_length=1, max_length=10, description="Tried in order; the first that answers wins."
    )
    tenant: str | None = Field(default=None, description="Admins only: another tenant's id or name.")


class ProfileOut(BaseModel):
    object: Literal["model_profile"] = "model_profile"
    tenant_id: str
    role: str
    model: str = Field(description="The id to send as `model` to use this profile.")
    models: list[str]
    updated_at: datetime

    @classmethod
    def of(cls, profile: ModelProfile) -> ProfileOut:
        return cls(
            tenant_id=profile.tenant_id,
            role=profile.role,
            model=f"profile:{profile.role}",
            models=list(profile.models),
            updated_at=profile.updated_at,
        )
