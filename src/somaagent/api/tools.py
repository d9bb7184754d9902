"""`/v1/tools`: the tools a tenant's agents may call, with their signed manifests; enable/disable."""

from __future__ import annotations

from typing import Any, Literal

import orjson
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from somaagent.api.deps import ServicesDep, SessionDep, ToolsAdminDep, ToolsExecuteDep
from somaagent.api.openai.docs import error_responses
from somaagent.core.errors import Forbidden, NotFound
from somaagent.core.pagination import ListOut
from somaagent.events.outbox import add_event
from somaagent.identity.service import act_for_tenant
from somaagent.tools.registry import ToolContext, ToolStatus, tool_call_event

router = APIRouter(prefix="/v1/tools", tags=["Tools"])


class ToolOut(BaseModel):
    object: Literal["tool"] = "tool"
    name: str
    description: str
    parameters: dict[str, Any]
    version: str
    side_effect: str
    publisher: str | None
    source: str = Field(description="`builtin`, or `mcp:<server>`.")
    enabled: bool
    config: dict[str, Any]
    digest: str = Field(description="SHA-256 of the manifest's canonical JSON (RFC 8785).")
    signature: str
    key_id: str

    @classmethod
    def of(cls, status: ToolStatus) -> ToolOut:
        signed = status.tool.signed
        manifest = signed.manifest
        return cls(
            name=manifest.name,
            description=manifest.description,
            parameters=dict(manifest.parameters),
            version=manifest.version,
            side_effect=manifest.side_effect,
            publisher=manifest.publisher,
            source=status.tool.source,
            enabled=status.enabled,
            config=status.config,
            digest=signed.digest,
            signature=signed.signature,
            key_id=signed.key_id,
        )


class ToolPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = None
    config: dict[str, Any] | None = Field(
        default=None,
        description='Tool configuration, e.g. `{"allowlist": ["intranet.example"]}` for http_fetch.',
    )


@router.get("", response_model=ListOut[ToolOut], responses=error_responses(401))
async def list_tools(
    principal: ToolsExecuteDep, services: ServicesDep, session: SessionDep
) -> ListOut[ToolOut]:
    return ListOut(data=[ToolOut.of(s) for s in await services.tools.statuses(session, principal)])


@router.patch("/{name}", response_model=ToolOut, responses=error_responses(400, 401, 403, 404))
async def configure_tool(
    name: str,
    body: ToolPatch,
    principal: ToolsAdminDep,
    services: ServicesDep,
    session: SessionDep,
    tenant: str | None = None,
) -> ToolOut:
    """Enable or disable a tool for the caller's tenant; admins also set its configuration."""
    if body.config is not None and not principal.is_admin:
        # A tenant's own allowlist would let it aim http_fetch at internal addresses (SSRF).
        raise Forbidden("only an admin key may change a tool's configuration", param="config")
    principal = await act_for_tenant(session, principal, tenant)
    status = await services.tools.configure(session, principal, name, body.enabled, body.config)
    await session.commit()
    return ToolOut.of(status)


class ToolInvokeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolInvokeOut(BaseModel):
    object: Literal["tool.result"] = "tool.result"
    name: str
    content: str
    is_error: bool
    error_code: str | None
    duration_ms: float


@router.post("/{name}/invoke", response_model=ToolInvokeOut, responses=error_responses(400, 401, 404))
async def invoke_tool(
    name: str, body: ToolInvokeIn, principal: ToolsExecuteDep, services: ServicesDep, session: SessionDep
) -> ToolInvokeOut:
    """Call an enabled tool directly, as an agent would (a failing call is a result with `is_error`)."""
    enabled = {s.tool.name: s for s in await services.tools.enabled(session, principal)}
    status = enabled.get(name)
    if status is None:
        raise NotFound(f"no enabled tool {name!r}; GET /v1/tools lists them", param="name")
    arguments = orjson.dumps(body.arguments).decode()
    # Through the same gates as an agent's calls: the policy, then approval (refused here: no run waits).
    outcome = await services.call_tool(status, ToolContext(principal, config=status.config), arguments)
    add_event(
        session, tool_call_event(principal, outcome, arguments, session_id=None, run_id=None, call_id=None)
    )
    await session.commit()
    services.relay.poke()
    return ToolInvokeOut(
        name=outcome.name,
        content=outcome.content,
        is_error=outcome.is_error,
        error_code=outcome.error_code,
        duration_ms=round(outcome.duration_s * 1000, 1),
    )
