"""The MCP servers a tenant registered, with their tools pinned as signed manifests.

Owns: register / list / get / refresh / delete / call over `McpServer` rows, pinning (an MCP tool →
a signed `mcp.<server>.<tool>` manifest), the address policy for streamable-HTTP servers.
May import: core, db, tools. Never: api — callers pass the principal, a session and an `McpAccess`.

A pinned tool is what the model is shown. Every call verifies the pin's signature, validates the
arguments against the pinned schema, and compares the server's *live* definition with the pin: a
server that changed a tool's description, schema or hints after registration ("rug pull") is refused
until an operator looks and refreshes. Registering a stdio server runs a command on this host, so it
takes an admin key; tenants may register HTTP servers at public addresses (or allowlisted ones).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Select, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.core.clock import utcnow
from somaagent.core.errors import Conflict, Forbidden, InvalidRequest, NotFound, SomaError
from somaagent.core.ids import new_id
from somaagent.core.principal import Principal
from somaagent.tools.manifest import (
    NAME_PATTERN,
    Manifest,
    SideEffect,
    SignedManifest,
    digest,
    key_id,
    sign_manifest,
    validate_arguments,
    verify_manifest,
)
from somaagent.tools.mcp_client import (
    McpCallResult,
    McpConnections,
    McpEndpoint,
    McpError,
    McpToolInfo,
)
from somaagent.tools.mcp_policy import check_http_url
from somaagent.tools.registry import DynamicTools, Tool, ToolContext, ToolImpl
from somaagent.tools.tables import McpServer

SERVER_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")
MAX_PINNED_TOOLS = 256
PIN_VERSION = "1.0.0"


class McpToolChanged(Conflict):
    """The server's live tool no longer matches what was pinned at registration (or it is gone)."""

    code = "mcp_tool_changed"


class McpToolFailed(McpError):
    """The MCP tool ran and reported a failure (its text is the message, for the model to read)."""

    code = "mcp_tool_error"


@dataclass(frozen=True, slots=True)
class McpAccess:
    """What the service functions need from the process: the pool, the pinning key, limits and policy."""

    connections: McpConnections
    signing_key: Ed25519PrivateKey = field(repr=False)
    http_allowlist: tuple[str, ...] = ()
    timeout_s: float = 30.0

    @property
    def trusted_keys(self) -> dict[str, Any]:
        """The trust map for `verify_manifest`: pins are signed by this server's own key."""
        public = self.signing_key.public_key()
        return {key_id(public): public}


@dataclass(frozen=True, slots=True)
class McpServerSpec:
    """A registration request."""

    name: str
    transport: Literal["stdio", "http"]
    command: Sequence[str] | None = None
    env: Mapping[str, str] | None = field(default=None, repr=False)
    url: str | None = None
    headers: Mapping[str, str] | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class PinnedTool:
    """One tool of a registered server: the server's name for it and its signed manifest."""

    server_id: str
    server_name: str
    mcp_name: str
    signed: SignedManifest
    endpoint: McpEndpoint = field(repr=False)

    @property
    def name(self) -> str:
        """What the model calls it: `mcp.<server>.<tool>`."""
        return self.signed.manifest.name


@dataclass(frozen=True, slots=True)
class SkippedTool:
    """A tool the server lists that could not be pinned, and why."""

    mcp_name: str
    reason: str


# --- service functions --------------------------------------------------------------------------------


async def register_server(
    session: AsyncSession, principal: Principal, access: McpAccess, spec: McpServerSpec
) -> McpServer:
    """Check, connect, list and pin the server's tools, then store it (the caller commits)."""
    endpoint = _checked_endpoint(principal, spec)
    if endpoint.transport == "http":
        await check_http_url(endpoint.url or "", access.http_allowlist, principal)
    existing = await session.scalar(_query(principal, spec.name))
    if existing is not None:
        raise Conflict(
            f"an MCP server named {spec.name!r} is already registered; refresh it "
            f"(POST /v1/mcp-servers/{spec.name}/refresh) or delete it first",
            param="name",
        )
    server_id = new_id("mcp")
    try:
        listed = await access.connections.list_tools(server_id, endpoint, access.timeout_s)
    except BaseException:
        await access.connections.forget(server_id)
        raise
    now = utcnow()
    row = McpServer(
        id=server_id,
        tenant_id=principal.tenant_id,
        name=spec.name,
        transport=endpoint.transport,
        command=list(endpoint.command) or None,
        env=dict(endpoint.env) or None,
        url=endpoint.url,
        headers=dict(endpoint.headers) or None,
        enabled=True,
        tools=pin_tools(spec.name, listed, access.signing_key),
        created_at=now,
        refreshed_at=now,
    )
    session.add(row)
    try:
        await session.flush()
    except IntegrityError as exc:  # registered concurrently under the same name
        await access.connections.forget(server_id)
        raise Conflict(f"an MCP server named {spec.name!r} is already registered", param="name") from exc
    return row


async def list_servers(session: AsyncSession, principal: Principal) -> list[McpServer]:
    """The tenant's servers, by name."""
    query = select(McpServer).where(McpServer.tenant_id == principal.tenant_id).order_by(McpServer.name)
    return list((await session.scalars(query)).all())


async def get_server(session: AsyncSession, principal: Principal, name: str) -> McpServer:
    """One of the tenant's servers; other tenants' servers do not exist."""
    row = await session.scalar(_query(principal, name))
    if row is None:
        raise NotFound(
            f"no MCP server named {name!r}; GET /v1/mcp-servers lists yours, POST registers one", param="name"
        )
    return row


async def refresh_server(
    session: AsyncSession, principal: Principal, access: McpAccess, name: str, *, reconnect: bool = False
) -> McpServer:
    """Re-list the server's tools and pin them anew: accepts the tools as they are now (caller commits).

    `reconnect` closes the kept session first (a stdio server is restarted, e.g. after an upgrade)."""
    row = await get_server(session, principal, name)
    endpoint = endpoint_of(row)
    if endpoint.transport == "http":
        await check_http_url(endpoint.url or "", access.http_allowlist, principal)
    if reconnect:
        await access.connections.forget(row.id)
    listed = await access.connections.list_tools(row.id, endpoint, access.timeout_s)
    row.tools = pin_tools(row.name, listed, access.signing_key)
    row.refreshed_at = utcnow()
    await session.flush()
    return row


async def delete_server(
    session: AsyncSession, principal: Principal, access: McpAccess, name: str
) -> McpServer:
    """Remove the server and close its connection (a stdio process is stopped); the caller commits."""
    row = await get_server(session, principal, name)
    await session.delete(row)
    await session.flush()
    await access.connections.forget(row.id)
    return row


async def call_tool(
    session: AsyncSession,
    principal: Principal,
    access: McpAccess,
    server_name: str,
    tool_name: str,
    arguments: Mapping[str, Any],
) -> McpCallResult:
    """Call a pinned tool of one of the tenant's servers (see `find_pinned`, `call_pinned`)."""
    tool = await find_pinned(session, principal, access, server_name, tool_name)
    return await call_pinned(principal, access, tool, arguments)


async def find_pinned(
    session: AsyncSession, principal: Principal, access: McpAccess, server_name: str, tool_name: str
) -> PinnedTool:
    """A pinned tool by its server's name for it (or `mcp.<server>.<tool>`), its pin verified."""
    row = await get_server(session, principal, server_name)
    if not row.enabled:
        raise Forbidden(f"MCP server {server_name!r} is disabled", code="mcp_server_disabled")
    for entry in row.tools or []:
        mcp_name = str(entry.get("mcp_name"))
        signed = entry.get("signed")
        if isinstance(signed, Mapping) and tool_name in (mcp_name, signed.get("manifest", {}).get("name")):
            return PinnedTool(row.id, row.name, mcp_name, verified_pin(signed, access), endpoint_of(row))
        if mcp_name == tool_name:
            raise InvalidRequest(
                f"tool {tool_name!r} of MCP server {server_name!r} was not pinned ({entry.get('skipped')}), "
                "so it cannot be called",
                param="tool",
                code="mcp_tool_not_pinned",
            )
    offered = ", ".join(str(e.get("mcp_name")) for e in row.tools or [] if "signed" in e) or "none"
    raise NotFound(
        f"MCP server {server_name!r} has no pinned tool {tool_name!r} (pinned: {offered}); if the server "
        f"added it since, POST /v1/mcp-servers/{server_name}/refresh",
        param="tool",
        code="mcp_tool_not_found",
    )


async def call_pinned(
    principal: Principal, access: McpAccess, tool: PinnedTool, arguments: Mapping[str, Any]
) -> McpCallResult:
    """Verify the pin, validate the arguments, refuse a changed live tool, then call it."""
    manifest = verify_manifest(tool.signed, access.trusted_keys)
    validate_arguments(manifest, arguments)
    if tool.endpoint.transport == "http":
        await check_http_url(tool.endpoint.url or "", access.http_allowlist, principal)
    live = await access.connections.list_tools(tool.server_id, tool.endpoint, access.timeout_s)
    _check_unchanged(tool, live)
    return await access.connections.call_tool(
        tool.server_id, tool.endpoint, tool.mcp_name, arguments, access.timeout_s
    )


async def pinned_tools(session: AsyncSession, principal: Principal, access: McpAccess) -> list[PinnedTool]:
    """Every verified pinned tool of the tenant's enabled servers (for the agent's tool registry)."""
    tools: list[PinnedTool] = []
    for row in await list_servers(session, principal):
        if row.enabled:
            tools += pinned_of(row, access)[0]
    return tools


def registry_source(access: McpAccess) -> DynamicTools:
    """The tenant's pinned MCP tools as `Tool`s for `ToolRegistry.add_dynamic` (source `mcp:<server>`)."""

    async def source(session: AsyncSession, principal: Principal) -> list[Tool]:
        return [
            Tool(
                signed=pinned.signed,
                impl=_tool_impl(access, pinned),
                # One listing (the rug-pull check) and one call, each bounded by the access timeout.
                timeout_s=2 * access.timeout_s + 1,
                source=f"mcp:{pinned.server_name}",
            )
            for pinned in await pinned_tools(session, principal, access)
        ]

    return source


def _tool_impl(access: McpAccess, pinned: PinnedTool) -> ToolImpl:
    async def impl(context: ToolContext, arguments: dict[str, Any]) -> str:
        result = await call_pinned(context.principal, access, pinned, arguments)
        if result.is_error:
            raise McpToolFailed(result.text or f"MCP tool {pinned.name!r} reported an error")
        return result.text

    return impl


# --- pinning ------------------------------------------------------------------------------------------


def tool_manifest(server_name: str, tool: McpToolInfo) -> Manifest:
    """The manifest an MCP tool is pinned as; raises InvalidRequest if the tool cannot be one."""
    name = f"mcp.{server_name}.{tool.name.lower()}"
    if NAME_PATTERN.fullmatch(name) is None:
        raise InvalidRequest(
            f"its name would become {name[:80]!r}, which is not a valid tool name (at most 64 characters of "
            "a-z, 0-9, '_', '.', '-')"
        )
    description = " ".join(tool.description.split()) or f"Tool {tool.name} of MCP server {server_name}."
    return Manifest(
        name=name,
        description=description,
        parameters=tool.input_schema,
        version=PIN_VERSION,
        side_effect=_side_effect(tool.annotations),
        publisher=f"mcp:{server_name}",
    )


def pin_tools(server_name: str, tools: list[McpToolInfo], key: Ed25519PrivateKey) -> list[dict[str, Any]]:
    """The stored form of a server's tool list: signed manifests, and the tools skipped with a reason."""
    entries: list[dict[str, Any]] = []
    seen: set[str] = set()
    for tool in tools:
        if len(seen) >= MAX_PINNED_TOOLS:
            entries.append({"mcp_name": tool.name, "skipped": f"more than {MAX_PINNED_TOOLS} tools"})
            continue
        try:
            manifest = tool_manifest(server_name, tool)
        except SomaError as exc:
            entries.append({"mcp_name": tool.name, "skipped": exc.message})
            continue
        if manifest.name in seen:
            entries.append({"mcp_name": tool.name, "skipped": f"{manifest.name!r} is taken by another tool"})
            continue
        seen.add(manifest.name)
        entries.append({"mcp_name": tool.name, "signed": sign_manifest(manifest, key).to_dict()})
    return entries


def pinned_of(row: McpServer, access: McpAccess) -> tuple[list[PinnedTool], list[SkippedTool]]:
    """A row's pinned tools whose pins verify, and the rest (not pinnable, or a pin that fails) with why."""
    endpoint = endpoint_of(row)
    pinned: list[PinnedTool] = []
    skipped: list[SkippedTool] = []
    for entry in row.tools or []:
        mcp_name = str(entry.get("mcp_name"))
        signed = entry.get("signed")
        if not isinstance(signed, Mapping):
            skipped.append(SkippedTool(mcp_name, str(entry.get("skipped"))))
            continue
        try:
            pinned.append(PinnedTool(row.id, row.name, mcp_name, verified_pin(signed, access), endpoint))
        except SomaError as exc:
            skipped.append(SkippedTool(mcp_name, f"{exc.message}; refresh the server to pin it again"))
    return pinned, skipped


def verified_pin(data: Mapping[str, Any], access: McpAccess) -> SignedManifest:
    """A stored pin as a `SignedManifest`, once its signature verifies (ManifestRejected otherwise)."""
    manifest = verify_manifest(data, access.trusted_keys)
    return SignedManifest(manifest, str(data["digest"]), str(data["signature"]), str(data["key_id"]))


def endpoint_of(row: McpServer) -> McpEndpoint:
    """How to reach a stored server (with its secrets: never put it in a response)."""
    if row.transport == "stdio":
        return McpEndpoint("stdio", command=tuple(row.command or ()), env=dict(row.env or {}), label=row.name)
    return McpEndpoint("http", url=row.url, headers=dict(row.headers or {}), label=row.name)


def _side_effect(annotations: Mapping[str, Any]) -> SideEffect:
    # MCP's defaults (no hints) are "may write, may reach the outside world": the most cautious class.
    if annotations.get("read_only_hint") is True:
        return "read"
    if annotations.get("open_world_hint") is False:
        return "write"
    return "external"


def _check_unchanged(tool: PinnedTool, live: list[McpToolInfo]) -> None:
    refresh = f"POST /v1/mcp-servers/{tool.server_name}/refresh after reviewing it"
    current = next((t for t in live if t.name == tool.mcp_name), None)
    if current is None:
        raise McpToolChanged(
            f"MCP server {tool.server_name!r} no longer offers tool {tool.mcp_name!r}; "
            f"to accept its current tools, {refresh}"
        )
    try:
        live_digest = digest(tool_manifest(tool.server_name, current))
    except SomaError:
        live_digest = ""
    if live_digest != tool.signed.digest:
        raise McpToolChanged(
            f"MCP server {tool.server_name!r} changed tool {tool.mcp_name!r} (description, schema or hints) "
            f"after it was pinned, so the call was refused; to accept the new definition, {refresh}"
        )


# --- checks -------------------------------------------------------------------------------------------


def _query(principal: Principal, name: str) -> Select[McpServer]:
    return select(McpServer).where(McpServer.tenant_id == principal.tenant_id, McpServer.name == name)


def _checked_endpoint(principal: Principal, spec: McpServerSpec) -> McpEndpoint:
    endpoint = _endpoint_of_spec(principal, spec)
    return replace(endpoint, label=spec.name)


def _endpoint_of_spec(principal: Principal, spec: McpServerSpec) -> McpEndpoint:
    if not isinstance(spec.name, str) or SERVER_NAME.fullmatch(spec.name) is None:
        raise InvalidRequest(
            f"MCP server name {spec.name!r} is invalid: use 1-32 characters of a-z, 0-9, '_', '-', "
            "starting with a letter (e.g. 'time')",
            param="name",
        )
    if spec.transport == "stdio":
        if not principal.is_admin:
            raise Forbidden(
                "registering a stdio MCP server runs a command on the SomaAgent host, so it needs an admin "
                "key; a tenant key may register a streamable-HTTP server (transport 'http', with a url)",
                code="mcp_stdio_admin_only",
            )
        if spec.url is not None or spec.headers:
            raise InvalidRequest("a stdio MCP server takes command and env, not url or headers", param="url")
        command = list(spec.command or [])
        if not command or not all(isinstance(part, str) and part and "\0" not in part for part in command):
            raise InvalidRequest(
                'a stdio MCP server needs command: a non-empty list of strings, e.g. ["mcp-server-time"]',
                param="command",
            )
        env = dict(spec.env or {})
        for key, value in env.items():
            if _ENV_NAME.fullmatch(key) is None or not isinstance(value, str) or "\0" in value:
                raise InvalidRequest(f"env name {key[:60]!r} is not a valid variable name", param="env")
        return McpEndpoint("stdio", command=tuple(command), env=env)
    if spec.transport == "http":
        if spec.command or spec.env:
            raise InvalidRequest(
                "an http MCP server takes url and headers, not command or env", param="command"
            )
        if not spec.url:
            raise InvalidRequest(
                "an http MCP server needs url, e.g. https://mcp.example.com/mcp", param="url"
            )
        headers = dict(spec.headers or {})
        for key, value in headers.items():
            bad_value = not isinstance(value, str) or "\n" in value or "\r" in value
            if _HEADER_NAME.fullmatch(key) is None or bad_value:
                raise InvalidRequest(f"header {key[:60]!r} is not a valid HTTP header", param="headers")
        return McpEndpoint("http", url=spec.url, headers=headers)
    raise InvalidRequest(f"transport {spec.transport!r} is invalid; use 'stdio' or 'http'", param="transport")
