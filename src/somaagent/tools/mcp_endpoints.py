"""What the MCP client speaks in: endpoints, tool descriptions, call results, and the `McpError` family.

Owns: `McpEndpoint`, `McpToolInfo`, `McpCallResult`, the errors, `safe_url`, `redact_secrets`.
May import: core. Never: db, api.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from somaagent.core.errors import UpstreamError

log = logging.getLogger(__name__)

Transport = Literal["stdio", "http"]


class McpError(UpstreamError):
    """An MCP server failed: it could not be reached, broke off, answered with an error, or was too slow."""

    code = "mcp_error"


class McpUnavailable(McpError):
    """The server could not be started or reached, or the connection broke during the request."""

    code = "mcp_unavailable"


class McpTimeout(McpError):
    """The server did not answer within the time allowed."""

    code = "mcp_timeout"


class McpNotSent(McpUnavailable):
    """The connection was gone before the request left: it did not run, so retrying is always safe."""


@dataclass(frozen=True, slots=True)
class McpEndpoint:
    """How to reach a server: a command to run (stdio) or a URL (streamable HTTP). Secrets never print."""

    transport: Transport
    command: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    url: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    label: str = field(default="", compare=False)  # the server's name in messages (default: its id)

    def __post_init__(self) -> None:
        if self.transport == "stdio" and not self.command:
            raise ValueError("a stdio MCP endpoint needs a command")
        if self.transport == "http" and not self.url:
            raise ValueError("an http MCP endpoint needs a url")

    def describe(self) -> str:
        """Where the server is, for messages: the program, or the URL without credentials or query."""
        if self.transport == "stdio":
            return f"command {self.command[0]!r}"
        return f"URL {safe_url(self.url or '')!r}"

    def secrets(self) -> list[str]:
        """The values that must never appear in a message or a log line."""
        return [v for v in (*self.env.values(), *self.headers.values()) if len(v) >= 4]


@dataclass(frozen=True, slots=True)
class McpToolInfo:
    """A tool as the server lists it."""

    name: str
    description: str
    input_schema: dict[str, Any]
    annotations: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class McpCallResult:
    """A tool's answer: its content as text, whether the tool reported an error, its structured output."""

    text: str
    is_error: bool
    structured: Any | None = None


def safe_url(url: str) -> str:
    """`url` without user info, query or fragment (where tokens tend to hide)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(invalid URL)"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def redact_secrets(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text
