"""`/v1/mcp-servers`: register, list, get, refresh, delete a tenant's MCP servers, and call their tools.

Environment values and header values are stored for the connection but never returned: responses
carry their names only, and the URL without credentials or query string.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from somaagent.api.deps import ServicesDep, SessionDep, ToolsAdminDep, ToolsExecuteDep
from somaagent.api.openai.docs import error_responses
from somaagent.api.services import Services
from somaagent.core.pagination import ListOut
from somaagent.identity.service import act_for_tenant
from somaagent.tools import mcp_servers
from somaagent.tools.mcp_client import safe_url
from somaagent.tools.tables import McpServer

router = APIRouter(prefix="/v1/mcp-servers", tags=["MCP servers"])


class McpServerIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="1-32 characters of a-z, 0-9, '_', '-'; tools appear as mcp.<name>.<tool>.")
    transport: Literal["stdio", "http"] = Field(description="`stdio` (admin keys only) or `http`.")
    command: list[str] | None = Field(default=None, description="stdio: the program and its arguments.")
    env: dict[str, str] | None = Field(default=None, description="stdio: extra environment (never returned).")
    url: str | None = Field(default=None, description="http: the streamable-HTTP endpoint, e.g. .../mcp.")
    headers: dict[str, str] | None = Field(default=None, description="http: headers (never returned).")


class PinnedToolOut(BaseModel):
    name: str = Field(description="The tool's name on the server.")
    tool: str = Field(description="The name agents call it by: mcp.<server>.<tool>.")
    description: str
    parameters: dict[str, Any]
    side_effect: str
    digest: str = Field(description="SHA-256 of the pinned manifest's canonical JSON.")


class SkippedToolOut(BaseModel):
    name: str
    reason: str


class McpServerOut(BaseModel):
    object: Literal["mcp_server"] = "mcp_server"
    id: str
    name: str
    transport: str
    command: list[str] | None
    env_names: list[str]
    url: str | None = Field(description="Without user info, query or fragment.")
    header_names: list[str]
    enabled: bool
    tools: list[PinnedToolOut]
    skipped_tools: list[SkippedToolOut] = Field(description="Listed by the server but not pinnable.")
    created_at: datetime
    refreshed_at: datetime | None

    @classmethod
    def of(cls, row: McpServer) -> McpServerOut:
        pinned: list[PinnedToolOut] = []
        skipped: list[SkippedToolOut] = []
        for entry in row.tools or []:
            signed = entry.get("signed")
            if isinstance(signed, dict):
                manifest = signed["manifest"]
                pinned.append(
                    PinnedToolOut(
                        name=entry["mcp_name"],
                        tool=manifest["name"],
                        description=manifest["description"],
                        parameters=manifest["parameters"],
                        side_effect=manifest["side_effect"],
                        digest=signed["digest"],
                    )
                )
            else:
                reason = str(entry.get("skipped"))
                skipped.append(SkippedToolOut(name=str(entry.get("mcp_name")), reason=reason))
        return cls(
            id=row.id,
            name=row.name,
            transport=row.transport,
            command=row.command,
            env_names=sorted(row.env or {}),
            url=safe_url(row.url) if row.url else None,
            header_names=sorted(row.headers or {}),
            enabled=row.enabled,
            tools=pinned,
            skipped_tools=skipped,
            created_at=row.created_at,
            refreshed_at=row.refreshed_at,
        )


class McpRefreshIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reconnect: bool = Field(
        default=False, description="Close the kept session first (a stdio server is restarted)."
    )


class McpCallIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arguments: dict[str, Any] = Field(default_factory=dict, description="Checked against the pinned schema.")


class McpCallOut(BaseModel):
    object: Literal["mcp_tool_result"] = "mcp_tool_result"
    server: str
    tool: str
    text: str = Field(description="The tool's content as text (images and resources are summarized).")
    is_error: bool = Field(description="True when the tool itself reported a failure.")
    structured: Any | None = None


def _access(services: Services) -> mcp_servers.McpAccess:
    return services.mcp


@router.post(
    "", response_model=McpServerOut, status_code=201, responses=error_responses(400, 401, 403, 409, 502)
)
async def register_server(
    body: McpServerIn,
    principal: ToolsAdminDep,
    services: ServicesDep,
    session: SessionDep,
    tenant: Annotated[str | None, Query(description="Admins: register it for this tenant.")] = None,
) -> McpServerOut:
    """Connect to the server, list its tools and pin each one as a signed manifest."""
    principal = await act_for_tenant(session, principal, tenant)
    spec = mcp_servers.McpServerSpec(
        name=body.name,
        transport=body.transport,
        command=body.command,
        env=body.env,
        url=body.url,
        headers=body.headers,
    )
    row = await mcp_servers.register_server(session, principal, _access(services), spec)
    await session.commit()
    return McpServerOut.of(row)


@router.get("", response_model=ListOut[McpServerOut], responses=error_responses(401))
async def list_servers(principal: ToolsExecuteDep, session: SessionDep) -> ListOut[McpServerOut]:
    return ListOut(data=[McpServerOut.of(r) for r in await mcp_servers.list_servers(session, principal)])


@router.get("/{name}", response_model=McpServerOut, responses=error_responses(401, 404))
async def get_server(name: str, principal: ToolsExecuteDep, session: SessionDep) -> McpServerOut:
    return McpServerOut.of(await mcp_servers.get_server(session, principal, name))


@router.post(
    "/{name}/refresh", response_model=McpServerOut, responses=error_responses(400, 401, 403, 404, 502)
)
async def refresh_server(
    name: str,
    principal: ToolsAdminDep,
    services: ServicesDep,
    session: SessionDep,
    body: McpRefreshIn | None = None,
) -> McpServerOut:
    """Re-list the server's tools and pin them as they are now (after reviewing a change)."""
    reconnect = body.reconnect if body is not None else False
    row = await mcp_servers.refresh_server(session, principal, _access(services), name, reconnect=reconnect)
    await session.commit()
    return McpServerOut.of(row)


@router.delete("/{name}", response_model=McpServerOut, responses=error_responses(401, 404))
async def delete_server(
    name: str, principal: ToolsAdminDep, services: ServicesDep, session: SessionDep
) -> McpServerOut:
    """Remove the server; its connection is closed (a stdio process is stopped)."""
    row = await mcp_servers.delete_server(session, principal, _access(services), name)
    await session.commit()
    return McpServerOut.of(row)


@router.post(
    "/{name}/tools/{tool}/call",
    response_model=McpCallOut,
    responses=error_responses(400, 401, 403, 404, 409, 502, 503),
)
async def call_tool(
    name: str,
    tool: str,
    body: McpCallIn,
    principal: ToolsExecuteDep,
    services: ServicesDep,
    session: SessionDep,
) -> McpCallOut:
    """Call a pinned tool directly (operators, tests): the same checks as an agent's call."""
    access = _access(services)
    pinned = await mcp_servers.find_pinned(session, principal, access, name, tool)
    # A call may take many seconds: end the read transaction so it holds no database connection.
    await session.commit()
    result = await mcp_servers.call_pinned(principal, access, pinned, body.arguments)
    return McpCallOut(
        server=name,
        tool=pinned.mcp_name,
        text=result.text,
        is_error=result.is_error,
        structured=result.structured,
    )
