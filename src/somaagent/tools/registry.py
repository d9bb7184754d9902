"""The tool registry: which tools exist, which a tenant has enabled, and the one way to call them.

Owns: `ToolRegistry`, `Tool`, `ToolContext`, `ToolOutcome`, `ToolCaller`, per-tenant enable/disable.
May import: core, db, tools. Never: api, agents — callers pass the principal and a context.

Every tool is a signed manifest plus an implementation. A manifest is verified when the tool is
registered and again before every call (a few tens of microseconds), so a manifest changed in memory
or in storage after it was signed is refused at execution too. Arguments are validated against the
manifest's schema before the implementation sees them; every failure becomes a `ToolOutcome` with
`is_error`, which the agent loop hands back to the model — a tool never crashes a run.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.core.clock import utcnow
from somaagent.core.errors import InvalidRequest, NotFound, SomaError
from somaagent.core.principal import Principal
from somaagent.events.schemas import TOOL_CALLS, Event
from somaagent.tools.manifest import Manifest, SignedManifest, validate_arguments, verify_manifest
from somaagent.tools.tables import ToolSetting

log = logging.getLogger(__name__)

# What the model sees of a tool's output at most; the rest is cut with a note (it costs context).
MAX_RESULT_CHARS = 8_000


# Writes one durable event into the calling run's log (type, data): how a gate shows what it does.
RecordEvent = Callable[[str, dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ToolContext:
    """Who calls, from where, and the tenant's configuration of this tool."""

    principal: Principal
    session_id: str | None = None
    run_id: str | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    call_id: str | None = None  # the model's id for this call, when a run makes it
    record: RecordEvent | None = None  # None outside a run (a direct invocation)


@dataclass(frozen=True, slots=True)
class ToolOutcome:
    """A finished call: text for the model, whether it failed, and how long it took."""

    name: str
    content: str
    is_error: bool
    duration_s: float
    error_code: str | None = None


# A tool's behaviour: validated arguments in, text out; raise `SomaError` for a clear failure.
ToolImpl = Callable[[ToolContext, dict[str, Any]], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class Tool:
    """A registered tool: its signed manifest, implementation, default state and call timeout."""

    signed: SignedManifest
    impl: ToolImpl
    enabled_by_default: bool = True
    timeout_s: float = 30.0
    source: str = "builtin"

    @property
    def name(self) -> str:
        """The name the model calls it by."""
        return self.signed.manifest.name

    @property
    def manifest(self) -> Manifest:
        """Its (verified) manifest."""
        return self.signed.manifest


@dataclass(frozen=True, slots=True)
class ToolStatus:
    """A tool as a tenant sees it."""

    tool: Tool
    enabled: bool
    config: dict[str, Any]


# One way to call a tool: `ToolRegistry.call`, or a gate wrapping it (policy, approval) with the same
# shape, so gates compose as `gate(next)` and the loop does not know which are in place.
ToolCaller = Callable[[ToolStatus, ToolContext, str], Awaitable[ToolOutcome]]

# Extra tools that depend on the tenant (MCP servers): (session, principal) → tools.
DynamicTools = Callable[[AsyncSession, Principal], Awaitable[list[Tool]]]


class ToolRegistry:
    """Built-in tools registered at start, plus per-tenant dynamic tools (MCP), with tenant settings."""

    def __init__(self, trusted_keys: Mapping[str, Ed25519PublicKey]) -> None:
        self._trusted = dict(trusted_keys)
        self._static: dict[str, Tool] = {}
        self._dynamic: list[DynamicTools] = []

    def register(self, tool: Tool) -> None:
        """Add a tool; its manifest must verify against the trusted keys."""
        verify_manifest(tool.signed, self._trusted)
        if tool.name in self._static:
            raise InvalidRequest(f"a tool named {tool.name!r} is already registered", param="name")
        self._static[tool.name] = tool

    def add_dynamic(self, source: DynamicTools) -> None:
        """Add a source of per-tenant tools (their manifests are verified at each call)."""
        self._dynamic.append(source)

    def trust(self, key_id: str, key: Ed25519PublicKey) -> None:
        """Trust another signing key (a publisher's)."""
        self._trusted[key_id] = key

    async def statuses(self, session: AsyncSession, principal: Principal) -> list[ToolStatus]:
        """Every tool the tenant could use, with its enabled flag and configuration."""
        tools = dict(self._static)
        for source in self._dynamic:
            for tool in await source(session, principal):
                tools.setdefault(tool.name, tool)
        settings = await _settings(session, principal.tenant_id)
        statuses = []
        for name in sorted(tools):
            tool = tools[name]
            row = settings.get(name)
            enabled = row.enabled if row is not None else tool.enabled_by_default
            statuses.append(ToolStatus(tool, enabled, dict(row.config) if row is not None else {}))
        return statuses

    async def enabled(
        self, session: AsyncSession, principal: Principal, allowed: list[str] | None = None
    ) -> list[ToolStatus]:
        """The tools this tenant has enabled, narrowed to `allowed` names when given."""
        return [
            s
            for s in await self.statuses(session, principal)
            if s.enabled and (allowed is None or s.tool.name in allowed)
        ]

    async def configure(
        self,
        session: AsyncSession,
        principal: Principal,
        name: str,
        enabled: bool | None,
        config: dict[str, Any] | None,
    ) -> ToolStatus:
        """Enable/disable a tool for the tenant or set its configuration (the caller commits)."""
        found = {s.tool.name: s for s in await self.statuses(session, principal)}
        status = found.get(name)
        if status is None:
            raise NotFound(f"no tool {name!r}; GET /v1/tools lists them", param="name")
        row = await session.get(ToolSetting, (principal.tenant_id, name))
        if row is None:
            row = ToolSetting(
                tenant_id=principal.tenant_id,
                name=name,
                enabled=status.enabled,
                config=status.config,
                updated_at=utcnow(),
            )
            session.add(row)
        if enabled is not None:
            row.enabled = enabled
        if config is not None:
            row.config = config
        row.updated_at = utcnow()
        await session.flush()
        return ToolStatus(status.tool, row.enabled, dict(row.config))

    async def call(self, status: ToolStatus, context: ToolContext, arguments_json: str) -> ToolOutcome:
        """Verify, validate and run one call; every failure comes back as an error outcome."""
        tool = status.tool
        started = time.perf_counter()

        def failed(message: str, code: str) -> ToolOutcome:
            return ToolOutcome(tool.name, message, True, time.perf_counter() - started, code)

        try:
            verify_manifest(tool.signed, self._trusted)
            arguments = parse_arguments(tool.name, arguments_json)
            validate_arguments(tool.manifest, arguments)
            async with asyncio.timeout(tool.timeout_s):
                text = await tool.impl(context, arguments)
        except TimeoutError:
            return failed(f"tool {tool.name!r} did not finish within {tool.timeout_s:g} s", "tool_timeout")
        except SomaError as exc:
            return failed(exc.message, exc.code)
        except Exception as exc:  # a tool's bug is the run's data, not the run's end
            log.warning("tool %s raised %s", tool.name, type(exc).__name__, exc_info=exc)
            return failed(f"tool {tool.name!r} failed: {type(exc).__name__}", "tool_error")
        return ToolOutcome(tool.name, _cap(text), False, time.perf_counter() - started)


def parse_arguments(name: str, arguments_json: str) -> dict[str, Any]:
    """The call's arguments as a JSON object, or InvalidRequest saying what is wrong."""
    try:
        value = json.loads(arguments_json or "{}")
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"arguments for tool {name!r} are not valid JSON: {exc.msg}") from exc
    if not isinstance(value, dict):
        raise InvalidRequest(f"arguments for tool {name!r} must be a JSON object")
    return value


def arguments_digest(arguments_json: str) -> str:
    """SHA-256 of the arguments as sent: `tool.calls` events carry this, never the arguments."""
    return hashlib.sha256(arguments_json.encode()).hexdigest()


def tool_call_event(
    principal: Principal,
    outcome: ToolOutcome,
    arguments_json: str,
    *,
    session_id: str | None,
    run_id: str | None,
    call_id: str | None,
) -> Event:
    """The `tool.calls` event of one call: who, which tool, a digest of the arguments, time, outcome."""
    return Event(
        topic=TOOL_CALLS,
        type="tool.called",
        tenant_id=principal.tenant_id,
        actor=principal.subject,
        data={
            "session_id": session_id,
            "run_id": run_id,
            "tool": outcome.name,
            "call_id": call_id,
            "args_sha256": arguments_digest(arguments_json),
            "duration_ms": round(outcome.duration_s * 1000, 1),
            "outcome": "ok" if not outcome.is_error else (outcome.error_code or "error"),
        },
    )


def _cap(text: str) -> str:
    if len(text) <= MAX_RESULT_CHARS:
        return text
    return text[:MAX_RESULT_CHARS] + f"\n[... {len(text) - MAX_RESULT_CHARS} more characters cut]"


async def _settings(session: AsyncSession, tenant_id: str) -> dict[str, ToolSetting]:
    rows = (await session.scalars(select(ToolSetting).where(ToolSetting.tenant_id == tenant_id))).all()
    return {row.name: row for row in rows}
