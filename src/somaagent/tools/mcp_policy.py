"""Which MCP server URLs a tenant may register: loopback, private and link-local addresses only if an
operator allowlisted `host[:port]` (SOMA_MCP_HTTP_ALLOWLIST); admins are trusted with the host.

Owns: `check_http_url`, `McpUrlBlocked`. May import: core, tools. Never: db, api.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from urllib.parse import urlsplit

from somaagent.core.errors import Forbidden, InvalidRequest
from somaagent.core.principal import Principal
from somaagent.tools.http_fetch import blocked_reason
from somaagent.tools.mcp_endpoints import safe_url


class McpUrlBlocked(Forbidden):
    """A tenant tried to register an HTTP server at a loopback/private/link-local address."""

    code = "mcp_url_blocked"


async def check_http_url(url: str, allowlist: Sequence[str], principal: Principal) -> None:
    """Refuse a tenant's URL at a loopback/private/link-local address unless `host[:port]` is allowlisted.

    Admins are trusted with the host (they may run commands on it); the check is for tenant keys.
    """
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise InvalidRequest(f"MCP server url is not a valid URL: {exc}", param="url") from exc
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host:
        raise InvalidRequest(
            f"MCP server url {safe_url(url)!r} must be an http:// or https:// URL with a host", param="url"
        )
    if principal.is_admin or _allowlisted(host, port, allowlist):
        return
    for address in await _addresses(host, port):
        reason = blocked_reason(address)
        if reason is not None:
            shown = host if host == str(address) else f"{host} ({address})"
            entry = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise McpUrlBlocked(
                f"refused MCP server URL {safe_url(url)!r}: {shown} is a {reason} address, which tenants may "
                f"not reach; an operator can allow it with SOMA_MCP_HTTP_ALLOWLIST='[\"{entry}\"]' "
                "or register the server with an admin key",
                param="url",
            )


def _allowlisted(host: str, port: int, allowlist: Sequence[str]) -> bool:
    for entry in allowlist:
        text = entry.strip().lower()
        if text.startswith("["):  # [v6] or [v6]:port
            inside, _, rest = text[1:].partition("]")
            if inside == host and (not rest or rest == f":{port}"):
                return True
            continue
        name, sep, entry_port = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
        if name == host and (not sep or entry_port == str(port)):
            return True
    return False


async def _addresses(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise InvalidRequest(f"could not resolve MCP server host {host!r}: {exc}", param="url") from exc
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
