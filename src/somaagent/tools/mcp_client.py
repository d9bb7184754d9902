"""The MCP client: a process-wide pool of kept-open sessions to MCP servers over stdio or streamable HTTP.

Owns: `McpConnections` (the pool); its types and errors live in `mcp_endpoints`, one session in
`mcp_connection`.
May import: core, the `mcp` SDK. Never: db, api — which server a tenant may reach is decided above.

Each connection is owned by one long-lived task that enters the SDK's context managers, serves every
request in its own task group and exits them again: anyio cancel scopes must be entered and left by
the same task, so callers never touch the SDK session directly — they hand a job to the owner and
await its future. A stdio server stays running between calls (starting one costs ~1 s, a call on a
kept session ~2 ms). A connection whose server exited is noticed (end of its stdout) and replaced by
the next call; a call in flight when it died fails with a clear error, since it may have run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import mcp_types as types
from mcp import Client

from somaagent.core.errors import Overloaded
from somaagent.tools.mcp_connection import McpConnection
from somaagent.tools.mcp_endpoints import (
    McpCallResult,
    McpEndpoint,
    McpError,
    McpNotSent,
    McpTimeout,
    McpToolInfo,
    McpUnavailable,
    safe_url,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

_MAX_TOOL_PAGES = 100


# --- the pool ---------------------------------------------------------------------------------------


class McpConnections:
    """Kept-open MCP sessions keyed by server id: at most `max_connections`, idle ones closed."""

    def __init__(
        self,
        *,
        max_connections: int = 64,
        max_in_flight: int = 8,
        connect_timeout_s: float = 20.0,
        idle_timeout_s: float = 600.0,
    ) -> None:
        self._max_connections = max_connections
        self._max_in_flight = max_in_flight
        self._connect_timeout_s = connect_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._connections: dict[str, McpConnection] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._closed = False

    async def list_tools(
        self, server_id: str, endpoint: McpEndpoint, timeout_s: float = 30.0
    ) -> list[McpToolInfo]:
        """The server's tools, every page."""

        async def op(client: Client) -> list[McpToolInfo]:
            tools: list[McpToolInfo] = []
            cursor: str | None = None
            for _ in range(_MAX_TOOL_PAGES):
                page = await client.list_tools(cursor=cursor, cache_mode="bypass")
                tools += [_tool_info(tool) for tool in page.tools]
                cursor = page.next_cursor
                if cursor is None:
                    break
            return tools

        return await self._request(server_id, endpoint, "tools/list", op, timeout_s, idempotent=True)

    async def call_tool(
        self,
        server_id: str,
        endpoint: McpEndpoint,
        name: str,
        arguments: Mapping[str, Any],
        timeout_s: float = 30.0,
    ) -> McpCallResult:
        """Call one tool. A tool's own failure is a result with `is_error`; a broken server raises."""

        async def op(client: Client) -> McpCallResult:
            return _call_result(await client.call_tool(name, dict(arguments)))

        what = f"tools/call {name!r}"
        return await self._request(server_id, endpoint, what, op, timeout_s, idempotent=False)

    async def forget(self, server_id: str) -> None:
        """Close the server's connection (a stdio process is stopped); the next use opens a new one."""
        connection = self._connections.pop(server_id, None)
        self._locks.pop(server_id, None)
        if connection is not None:
            await connection.close()

    async def close(self) -> None:
        """Close every connection (app shutdown)."""
        self._closed = True
        connections = list(self._connections.values())
        self._connections.clear()
        await asyncio.gather(*(c.close() for c in connections), return_exceptions=True)

    def open_count(self) -> int:
        """How many connections are open (for metrics and tests)."""
        return sum(1 for c in self._connections.values() if c.alive)

    async def _request(
        self,
        server_id: str,
        endpoint: McpEndpoint,
        what: str,
        op: Callable[[Client], Awaitable[T]],
        timeout_s: float,
        *,
        idempotent: bool,
    ) -> T:
        # One retry on a new connection (a stdio server restarted) when the old one had died: always
        # for a request that never left, for a call in flight only if it is safe to run twice.
        for attempt in (1, 2):
            connection = await self._connection(server_id, endpoint)
            try:
                return await connection.request(what, op, timeout_s)
            except McpUnavailable as exc:
                if self._connections.get(server_id) is connection and not connection.alive:
                    self._connections.pop(server_id, None)
                    await connection.close()
                if attempt == 2 or not (idempotent or isinstance(exc, McpNotSent)):
                    raise
        raise AssertionError("unreachable")

    async def _connection(self, server_id: str, endpoint: McpEndpoint) -> McpConnection:
        if self._closed:
            raise McpUnavailable("the MCP connection pool is closed (the server is shutting down)")
        lock = self._locks.setdefault(server_id, asyncio.Lock())
        async with lock:
            current = self._connections.get(server_id)
            if current is not None and current.alive and current.endpoint == endpoint:
                return current
            if current is not None:
                # Its server exited, or it was re-registered with another command/URL: start afresh, once.
                self._connections.pop(server_id, None)
                await current.close()
            await self._make_room()
            connection = McpConnection(server_id, endpoint, self._max_in_flight)
            self._connections[server_id] = connection
            try:
                await connection.wait_ready(self._connect_timeout_s)
            except BaseException:
                if self._connections.get(server_id) is connection:
                    self._connections.pop(server_id, None)
                await connection.close()
                raise
            log.info("mcp session opened", extra={"mcp_server": server_id, "transport": endpoint.transport})
            return connection

    async def _make_room(self) -> None:
        now = time.monotonic()
        for key, connection in list(self._connections.items()):
            idle = connection.in_flight == 0 and now - connection.last_used > self._idle_timeout_s
            if idle or not connection.alive:
                self._connections.pop(key, None)
                await connection.close()
        if len(self._connections) < self._max_connections:
            return
        idle_ones = sorted(
            (c for c in self._connections.values() if c.in_flight == 0), key=lambda c: c.last_used
        )
        if not idle_ones:
            raise Overloaded(
                f"all {self._max_connections} MCP connections are busy; retry shortly "
                "(or raise SOMA_MCP_MAX_CONNECTIONS)",
                retry_after=1.0,
            )
        oldest = idle_ones[0]
        self._connections.pop(oldest.server_id, None)
        await oldest.close()


# --- SDK types → ours -------------------------------------------------------------------------------


def _tool_info(tool: types.Tool) -> McpToolInfo:
    annotations = tool.annotations.model_dump(exclude_none=True) if tool.annotations is not None else {}
    return McpToolInfo(
        name=tool.name,
        description=tool.description or tool.title or "",
        input_schema=dict(tool.input_schema),
        annotations=annotations,
    )


def _call_result(result: types.CallToolResult) -> McpCallResult:
    parts = [_content_text(item) for item in result.content]
    structured = result.structured_content
    text = "\n".join(p for p in parts if p)
    if not text and structured is not None:
        text = json.dumps(structured, ensure_ascii=False)
    return McpCallResult(text=text, is_error=bool(result.is_error), structured=structured)


def _content_text(item: Any) -> str:
    kind = getattr(item, "type", "")
    if kind == "text":
        return str(item.text)
    if kind in ("image", "audio"):
        size = len(item.data) * 3 // 4  # base64
        return f"[{kind} {item.mime_type}, about {size} bytes]"
    if kind == "resource_link":
        return f"[resource link {item.uri}]"
    if kind == "resource":
        resource = item.resource
        text = getattr(resource, "text", None)
        if text is not None:
            return str(text)
        return f"[resource {resource.uri} ({resource.mime_type or 'binary'})]"
    return f"[{kind or 'unknown'} content]"


__all__ = [
    "McpCallResult",
    "McpConnections",
    "McpEndpoint",
    "McpError",
    "McpTimeout",
    "McpToolInfo",
    "McpUnavailable",
    "safe_url",
]
