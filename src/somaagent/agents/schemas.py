"""API schemas for personas, sessions, messages, runs and events (tables are not API schemas)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from somaagent.agents.tables import AgentMessage, AgentRun, AgentSession, Persona

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MemoryPolicy(_Strict):
    """How a persona's runs use long-term memory."""

    recall: bool = Field(default=True, description="Recall memories for each message and inject them.")
    top_k: int = Field(default=3, ge=1, le=20)
    min_score: float = Field(
        default=0.35, ge=-1, le=1, description="Recalled memories below this are skipped."
    )
    remember: list[Literal["user", "assistant"]] = Field(
        default=["user"], description="Which turns each run stores as memories."
    )
    namespace: str = Field(
        default="default", description="Memory namespace; `{persona}` and `{session}` are replaced."
    )


class RunLimits(_Strict):
    """Bounds of one run; hitting one ends the run with `run.failed` naming it."""

    max_steps: int = Field(default=8, ge=1, le=64, description="Model calls per run.")
    max_tool_calls: int = Field(default=8, ge=0, le=128)
    timeout_s: float = Field(default=120.0, gt=0, le=3600, description="Wall clock of the whole run.")
    max_tokens: int | None = Field(default=None, ge=1, le=32_768, description="Per model call.")
    temperature: float | None = Field(default=None, ge=0, le=2)


class PersonaIn(_Strict):
    name: str = Field(pattern=NAME_PATTERN, description="Lowercase letters, digits, '-' and '_'.")
    description: str = Field(default="", max_length=2_000)
    system_prompt: str = Field(default="", max_length=32_000)
    model: str | None = Field(default=None, description="A model id or `profile:<role>`.")
    tools: list[str] | None = Field(default=None, description="Allowed tool names; null: every enabled tool.")
    memory: MemoryPolicy = Field(default_factory=MemoryPolicy)
    limits: RunLimits = Field(default_factory=RunLimits)


class PersonaPatch(_Strict):
    description: str | None = Field(default=None, max_length=2_000)
    system_prompt: str | None = Field(default=None, max_length=32_000)
    model: str | None = None
    tools: list[str] | None = None
    memory: MemoryPolicy | None = None
    limits: RunLimits | None = None


class PersonaOut(BaseModel):
    object: Literal["persona"] = "persona"
    id: str
    name: str
    description: str
    system_prompt: str
    model: str | None
    tools: list[str] | None
    memory: MemoryPolicy
    limits: RunLimits
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: Persona) -> PersonaOut:
        return cls(
            id=row.id,
            name=row.name,
            description=row.description,
            system_prompt=row.system_prompt,
            model=row.model,
            tools=row.tools,
            memory=MemoryPolicy(**row.memory),
            limits=RunLimits(**row.limits),
            created_at=row.created_at,
            updated_at=row.updated_at,
        )


class SessionIn(_Strict):
    persona: str | None = Field(default=None, description="A persona name; null: the default assistant.")
    model_profile: str | None = Field(
        default=None, description="A model id or `profile:<role>` overriding the persona's."
    )
    metadata: dict[str, Any] = Field(default_factory=dict)


class SessionOut(BaseModel):
    object: Literal["session"] = "session"
    id: str
    persona: str | None
    model_profile: str | None
    metadata: dict[str, Any]
    active_run_id: str | None
    last_event_id: int
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: AgentSession) -> SessionOut:
        return cls(
            id=row.id,
            persona=row.persona,
            model_profile=row.model,
            metadata=row.meta,
            active_run_id=row.active_run_id,
            last_event_id=row.last_seq,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )


class SessionListOut(BaseModel):
    object: Literal["list"] = "list"
    data: list[SessionOut]
    has_more: bool


class Attachment(_Strict):
    name: str = Field(min_length=1, max_length=256)
    content: str = Field(max_length=200_000, description="Text content, given to the model with the message.")
    media_type: Literal["text/plain", "text/markdown", "application/json", "text/csv"] = "text/plain"


class ForcedTool(_Strict):
    type: Literal["function"] = "function"
    name: str


class MessageIn(_Strict):
    content: str = Field(min_length=1, max_length=100_000)
    attachments: list[Attachment] = Field(default_factory=list, max_length=16)
    tool_choice: Literal["auto", "none", "required"] | ForcedTool = Field(
        default="auto",
        description=(
            "For the run's first model call. After a forced call (`required` or a named tool) the next "
            "call answers without tools; with `auto` the model decides at every step."
        ),
    )
    model: str | None = Field(default=None, description="Override the session's model for this run.")
    max_tokens: int | None = Field(default=None, ge=1, le=32_768)
    temperature: float | None = Field(default=None, ge=0, le=2)
    seed: int | None = None
    stream: bool = Field(default=True, description="SSE run events; false: wait and answer the finished run.")


class ToolCallOut(BaseModel):
    id: str
    name: str
    arguments: str


class HistoryMessageOut(BaseModel):
    role: str
    content: str | None
    tool_calls: list[ToolCallOut] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    run_id: str | None = None
    event_id: int
    created_at: datetime

    @classmethod
    def of(cls, row: AgentMessage) -> HistoryMessageOut:
        return cls(
            role=row.role,
            content=row.content,
            tool_calls=[ToolCallOut(**c) for c in row.tool_calls] if row.tool_calls else None,
            tool_call_id=row.tool_call_id,
            name=row.name,
            run_id=row.run_id,
            event_id=row.seq,
            created_at=row.created_at,
        )


class HistoryOut(BaseModel):
    object: Literal["list"] = "list"
    data: list[HistoryMessageOut]


class RunOut(BaseModel):
    object: Literal["run"] = "run"
    id: str
    session_id: str
    status: Literal["running", "completed", "failed", "cancelled"]
    reason: str | None
    model: str | None
    steps: int
    tool_calls: int
    usage: dict[str, int]
    started_at: datetime
    finished_at: datetime | None
    duration_s: float | None
    answer: str | None = None

    @classmethod
    def of(cls, row: AgentRun, answer: str | None = None) -> RunOut:
        return cls(
            id=row.id,
            session_id=row.session_id,
            status=row.status,
            reason=row.reason,
            model=row.model,
            steps=row.steps,
            tool_calls=row.tool_calls,
            usage={
                "prompt_tokens": row.prompt_tokens,
                "completion_tokens": row.completion_tokens,
                "total_tokens": row.prompt_tokens + row.completion_tokens,
            },
            started_at=row.started_at,
            finished_at=row.finished_at,
            duration_s=row.duration_s,
            answer=answer,
        )


class EventOut(BaseModel):
    id: int
    type: str
    session_id: str
    run_id: str | None
    created_at: datetime
    data: dict[str, Any]


class EventListOut(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventOut]
    has_more: bool = False


class ExportedMessage(_Strict):
    role: Literal["user", "assistant", "tool", "system"]
    content: str | None = None
    tool_calls: list[ToolCallOut] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class SessionExport(_Strict):
    """A whole session as JSON: what `GET …/export` gives and `POST /v1/sessions/import` takes."""

    object: Literal["session.export"] = "session.export"
    version: Literal[1] = 1
    persona: str | None = None
    model_profile: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    messages: list[ExportedMessage] = Field(max_length=10_000)
    events: list[EventOut] = Field(default_factory=list, description="Informational; not re-imported.")
