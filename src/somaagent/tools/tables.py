"""Tool tables: per-tenant tool settings (enabled, configuration), registered MCP servers, and human
approvals of tool calls."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from somaagent.db.base import Base, TenantMixin, UTCDateTime


class ToolSetting(TenantMixin, Base):
    """A tenant's choice for one tool: enabled or not, and its configuration (an http allowlist, say).

    No row means the tool's default (built-ins are enabled by default)."""

    __tablename__ = "tool_settings"

    tenant_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(160), primary_key=True)
    enabled: Mapped[bool] = mapped_column(Boolean)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class McpServer(TenantMixin, Base):
    """An MCP server a tenant registered: reached over stdio (a command) or streamable HTTP (a URL).

    `tools` caches the server's tool list as signed manifests (pinned at registration/refresh): a
    server whose tool definitions change afterwards is refused until it is refreshed."""

    __tablename__ = "mcp_servers"
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_mcp_servers_tenant_name"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    transport: Mapped[str] = mapped_column(String(16))  # stdio | http
    command: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    env: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)
    url: Mapped[str | None] = mapped_column(Text, nullable=True)
    headers: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    tools: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    refreshed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class Approval(TenantMixin, Base):
    """A tool call waiting for (or decided by) a human: the run that asked, the call, and the decision.

    `two_key`: the policy must allow the call again when it is approved, and the approver must be
    someone other than the caller."""

    __tablename__ = "approvals"
    __table_args__ = (Index("ix_approvals_tenant_status", "tenant_id", "status", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    session_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    run_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    call_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    tool: Mapped[str] = mapped_column(String(160))
    arguments: Mapped[str] = mapped_column(Text)  # as the model sent them (JSON text)
    reason: Mapped[str] = mapped_column(Text)
    side_effect: Mapped[str] = mapped_column(String(16))
    two_key: Mapped[bool] = mapped_column(Boolean)
    status: Mapped[str] = mapped_column(String(16))  # pending | approved | rejected | expired
    requested_by: Mapped[str] = mapped_column(String(255))
    decided_by: Mapped[str | None] = mapped_column(String(255), nullable=True)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
