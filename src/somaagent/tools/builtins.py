"""The built-in tools: `python` (sandboxed), `http_fetch`, `memory_search`, `current_time`.

Owns: their manifests and implementations. May import: core, tools. Never: memory, agents, api —
`memory_search` gets its search function injected by the composition root.

Manifests are signed at start with the server's tool-signing key (`signing_key_from_secret`), so the
registry verifies built-ins exactly as it verifies any publisher's tool.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from somaagent.core.errors import InvalidRequest
from somaagent.tools.http_fetch import FetchPolicy, http_fetch
from somaagent.tools.manifest import Manifest, sign_manifest
from somaagent.tools.registry import Tool, ToolContext
from somaagent.tools.sandbox import SandboxLimits, run_python

PUBLISHER = "somaagent"
_ZONE_PATTERN = r"^[A-Za-z_]{1,20}(/[A-Za-z_+-]{1,20}){0,2}$"
VERSION = "1.0.0"

# (context, query, top_k) → [(memory id, text, score)]: injected, so tools never import memory.
MemorySearch = Callable[[ToolContext, str, int], Awaitable[list[tuple[str, str, float]]]]


def signing_key_from_secret(secret: bytes) -> Ed25519PrivateKey:
    """The server's Ed25519 tool-signing key, derived from its secret: every replica sharing
    `SOMA_SECRET_KEY` signs and trusts the same manifests without another key to distribute."""
    seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"somaagent tool manifests").derive(
        secret
    )
    return Ed25519PrivateKey.from_private_bytes(seed)


def _schema(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


PYTHON = Manifest(
    name="python",
    description=(
        "Run Python 3 code in an isolated sandbox (no network, no host files, a private scratch "
        "directory) and return what it prints. Use print() to show results."
    ),
    parameters=_schema(
        {"code": {"type": "string", "maxLength": 100_000, "description": "Python source to run"}}, ["code"]
    ),
    version=VERSION,
    side_effect="read",
    publisher=PUBLISHER,
)
HTTP_FETCH = Manifest(
    name="http_fetch",
    description="Fetch a public web page or API over HTTP(S) GET and return its text (size and time capped).",
    parameters=_schema(
        {"url": {"type": "string", "pattern": r"^https?://\S+$", "maxLength": 2048, "description": "URL"}},
        ["url"],
    ),
    version=VERSION,
    side_effect="external",
    publisher=PUBLISHER,
)
MEMORY_SEARCH = Manifest(
    name="memory_search",
    description="Search long-term memory for facts relevant to a query; returns the best matches.",
    parameters=_schema(
        {
            "query": {"type": "string", "minLength": 1, "maxLength": 500, "description": "what to look for"},
            "top_k": {"type": "integer", "minimum": 1, "maximum": 20, "default": 5},
        },
        ["query"],
    ),
    version=VERSION,
    side_effect="read",
    publisher=PUBLISHER,
)
CURRENT_TIME = Manifest(
    name="current_time",
    description="The current date and time, in UTC or in an IANA time zone such as Europe/Paris.",
    # The pattern keeps a grammar-constrained model from filling the field with anything but a zone name.
    parameters=_schema(
        {
            "timezone": {
                "type": "string",
                "pattern": _ZONE_PATTERN,
                "description": "IANA zone name, default UTC",
            }
        },
        [],
    ),
    version=VERSION,
    side_effect="read",
    publisher=PUBLISHER,
)


async def _python(_context: ToolContext, arguments: dict[str, Any]) -> str:
    # The operator's limits, never a tenant's: a tenant must not be able to raise its own ceilings.
    result = await run_python(arguments["code"], SandboxLimits())
    parts = []
    if result.stdout:
        parts.append(result.stdout)
    if result.stderr:
        parts.append(f"[stderr]\n{result.stderr}")
    if result.error:
        parts.append(f"[sandbox] {result.error}")
    elif result.exit_code != 0:
        parts.append(f"[exit code {result.exit_code}]")
    return "\n".join(parts) or "[no output]"


async def _http_fetch(context: ToolContext, arguments: dict[str, Any]) -> str:
    policy = FetchPolicy(allowlist=tuple(context.config.get("allowlist", ())))
    fetched = await http_fetch(arguments["url"], policy)
    note = " (truncated)" if fetched.truncated else ""
    return f"HTTP {fetched.status} {fetched.url}{note}\n\n{fetched.text()}"


async def _current_time(_context: ToolContext, arguments: dict[str, Any]) -> str:
    name = arguments.get("timezone") or "UTC"
    try:
        zone = UTC if name == "UTC" else ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidRequest(f"unknown time zone {name!r}; use an IANA name such as 'Europe/Paris'") from exc
    now = datetime.now(zone)
    return json.dumps(
        {"timezone": name, "datetime": now.isoformat(timespec="seconds"), "weekday": now.strftime("%A")}
    )


def _memory_search(search: MemorySearch) -> Callable[[ToolContext, dict[str, Any]], Awaitable[str]]:
    async def run(context: ToolContext, arguments: dict[str, Any]) -> str:
        found = await search(context, arguments["query"], int(arguments.get("top_k", 5)))
        if not found:
            return "No matching memories."
        return "\n".join(
            f"[{n}] {text} (score {score:.2f}, id {mid})"
            for n, (mid, text, score) in enumerate(found, start=1)
        )

    return run


def builtin_tools(key: Ed25519PrivateKey, memory_search: MemorySearch) -> list[Tool]:
    """The built-ins, signed with `key`."""
    return [
        Tool(sign_manifest(PYTHON, key), _python, timeout_s=60.0),
        Tool(sign_manifest(HTTP_FETCH, key), _http_fetch, timeout_s=30.0),
        Tool(sign_manifest(MEMORY_SEARCH, key), _memory_search(memory_search), timeout_s=30.0),
        Tool(sign_manifest(CURRENT_TIME, key), _current_time, timeout_s=5.0),
    ]
