"""Agent tables: personas, sessions, their conversation messages, runs, and the append-only event log.

The event log is what a client replays (`Last-Event-ID`); the messages are what the model sees. Both
are written in the same transaction as the state change they record, before anything is streamed.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from somaagent.db.base import Base, TenantMixin, UTCDateTime


class Persona(TenantMixin, Base):
    """A named agent: system prompt, default model, the tools it may use, memory and run limits."""

    __tablename__ = "personas"
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_personas_tenant_name"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    description: Mapped[str] = mapped_column(Text, default="")
    system_prompt: Mapped[str] = mapped_column(Text, default="")
    # A model id or `profile:<role>`; None: the tenant's `profile:chat` if set, else the default model.
    model: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # Tool names this persona may call; None means every tool enabled for the tenant.
    tools: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    # Memory: recall before each run, remember each turn, in this namespace ({session}, {persona} expand).
    memory: Mapped[dict[str, Any]] = mapped_column(JSON)
    # Run limits: max_steps, max_tool_calls, timeout_s, max_tokens, temperature.
    limits: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class AgentSession(TenantMixin, Base):
    """A conversation with an agent. `last_seq` numbers its events; `active_run_id` is its one live run."""

    __tablename__ = "agent_sessions"
    __table_args__ = (Index("ix_agent_sessions_tenant_created", "tenant_id", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    persona: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model: Mapped[str | None] = mapped_column(String(128), nullable=True)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON)
    last_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    active_run_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    # The tenant's constitution when the session last ran; a run under a newer one says so first.
    constitution_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class AgentMessage(TenantMixin, Base):
    """One turn the model sees again next time: user, assistant (maybe with tool calls) or tool result."""

    __tablename__ = "agent_messages"
    __table_args__ = (
        Index("ix_agent_messages_session_seq", "session_id", "seq"),
        Index("ix_agent_messages_run", "run_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    session_id: Mapped[str] = mapped_column(String(40))
    # The seq of the event that recorded this message (orders history; ties cannot happen).
    seq: Mapped[int] = mapped_column(BigInteger)
    run_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str | None] = mapped_column(Text, nullable=True)
    tool_calls: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    tool_call_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class AgentRun(TenantMixin, Base):
    """One answer to one user message: its status, why it ended, what it cost."""

    __tablename__ = "agent_runs"
    __table_args__ = (
        Index("ix_agent_runs_session", "session_id", "id"),
        # The heartbeat's sweep for runs whose process died.
        Index("ix_agent_runs_status_heartbeat", "status", "heartbeat_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    session_id: Mapped[str] = mapped_column(String(40))
    # running | completed | failed | cancelled
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    model: Mapped[str | None] = mapped_column(String(128), nullable=True)
    steps: Mapped[int] = mapped_column(Integer, default=0)
    tool_calls: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # Refreshed while the run lives; a running run whose heartbeat is stale died with its process.
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)


class AgentEvent(TenantMixin, Base):
    """The append-only log of a session: every run event that changes state, numbered by `seq`."""

    __tablename__ = "agent_events"

    session_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    run_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    type: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
