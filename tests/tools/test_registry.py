"""The tool registry with the real built-ins: signatures checked at registration and before every call,
arguments validated, failures returned as results, and the server's signing key derived from its secret."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

from somaagent.core.principal import Principal
from somaagent.identity.capabilities import TENANT_CAPABILITIES
from somaagent.tools.builtins import CURRENT_TIME, builtin_tools, signing_key_from_secret
from somaagent.tools.manifest import ManifestRejected, new_signing_key, sign_manifest, trusted_keys_from
from somaagent.tools.registry import Tool, ToolContext, ToolRegistry, ToolStatus

PRINCIPAL = Principal("ten_x", "x", "key:k", "k", TENANT_CAPABILITIES)


async def _no_memory(_context: ToolContext, _query: str, _top_k: int) -> list[tuple[str, str, float]]:
    return []


def registry() -> tuple[ToolRegistry, list[Tool]]:
    key = signing_key_from_secret(b"a server secret")
    tools = builtin_tools(key, _no_memory)
    reg = ToolRegistry(trusted_keys_from(key.public_key()))
    for tool in tools:
        reg.register(tool)
    return reg, tools


def call(reg: ToolRegistry, tool: Tool, arguments: str) -> tuple[str, bool, str | None]:
    outcome = asyncio.run(reg.call(ToolStatus(tool, True, {}), ToolContext(PRINCIPAL), arguments))
    return outcome.content, outcome.is_error, outcome.error_code


def test_the_signing_key_is_derived_from_the_secret() -> None:
    one, two = signing_key_from_secret(b"s"), signing_key_from_secret(b"s")
    assert one.public_key().public_bytes_raw() == two.public_key().public_bytes_raw()
    other = signing_key_from_secret(b"t")
    assert other.public_key().public_bytes_raw() != one.public_key().public_bytes_raw()


def test_untrusted_or_tampered_tools_are_refused_at_registration() -> None:
    reg, tools = registry()
    stranger = Tool(sign_manifest(CURRENT_TIME, new_signing_key()), tools[-1].impl)
    with pytest.raises(ManifestRejected) as unknown:
        ToolRegistry(trusted_keys_from(signing_key_from_secret(b"x").public_key())).register(stranger)
    assert unknown.value.code == "manifest_unknown_key"
    clock = next(t for t in tools if t.name == "current_time")
    changed = dataclasses.replace(
        clock.signed, manifest=dataclasses.replace(clock.manifest, description="Also deletes files.")
    )
    with pytest.raises(ManifestRejected) as tampered:
        ToolRegistry(trusted_keys_from(signing_key_from_secret(b"a server secret").public_key())).register(
            dataclasses.replace(clock, signed=changed)
        )
    assert tampered.value.code == "manifest_tampered"
    with pytest.raises(Exception, match="already registered"):
        reg.register(clock)


def test_a_manifest_changed_after_registration_is_refused_at_execution() -> None:
    reg, tools = registry()
    clock = next(t for t in tools if t.name == "current_time")
    assert call(reg, clock, "{}")[1] is False
    # Frozen dataclasses can still be forced; the registry re-verifies before each call.
    object.__setattr__(clock.signed.manifest, "description", "now with side effects")
    content, is_error, code = call(reg, clock, "{}")
    assert is_error and code == "manifest_tampered" and "changed after signing" in content


def test_arguments_are_checked_and_failures_are_results() -> None:
    reg, tools = registry()
    clock = next(t for t in tools if t.name == "current_time")
    content, is_error, code = call(reg, clock, '{"timezone": 5}')
    assert is_error and code == "invalid_tool_arguments" and "$.timezone" in content
    assert call(reg, clock, '{"zone": "UTC"}')[2] == "invalid_tool_arguments"
    assert "not valid JSON" in call(reg, clock, '{"timezone": ')[0]
    assert "must be a JSON object" in call(reg, clock, "[1]")[0]
    ok, is_error, _ = call(reg, clock, '{"timezone": "Asia/Tokyo"}')
    assert not is_error and json.loads(ok)["timezone"] == "Asia/Tokyo"
    python = next(t for t in tools if t.name == "python")
    out, is_error, _ = call(
        reg, python, json.dumps({"code": "import socket; socket.create_connection(('1.1.1.1', 53))"})
    )
    assert not is_error and "Network is unreachable" in out, out  # the sandbox has no network
