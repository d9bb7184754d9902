"""Which tool calls need a person: the tenant's approval rules applied to one tool.

Owns: `ApprovalRules` (what `policy.document.ApprovalSettings` provides), `Requirement`, `requirement`.
May import: tools. Never: policy, db — the rules are handed in.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from somaagent.tools.registry import ToolStatus


class ApprovalRules(Protocol):
    """Which calls need a person (the tenant's `approvals` policy settings)."""

    @property
    def side_effects(self) -> Sequence[str]: ...
    @property
    def tools(self) -> Mapping[str, str]: ...  # tool name or glob → always | never | two_key
    @property
    def ttl_s(self) -> float | None: ...


ApprovalSettingsFor = Callable[[str], Awaitable[ApprovalRules]]  # tenant id → its rules


@dataclass(frozen=True, slots=True)
class Requirement:
    """Why a call needs a person, and whether it needs two keys."""

    reason: str
    two_key: bool


def requirement(rules: ApprovalRules, status: ToolStatus) -> Requirement | None:
    """Whether (and why) this tool's calls need approval under `rules`; None: they run at once."""
    name = status.tool.name
    side_effect = status.tool.manifest.side_effect
    mode = _tool_mode(rules.tools, name)
    if mode == "never":
        return None
    if mode == "two_key":
        return Requirement(
            f"tool {name!r} is two-key (approvals.tools): a second person must approve it, and the "
            "policy must allow it when they do",
            True,
        )
    if mode == "always":
        return Requirement(f"tool {name!r} always needs approval (approvals.tools)", False)
    if side_effect in rules.side_effects:
        return Requirement(
            f"tool {name!r} has side effect {side_effect!r}, which needs a person (approvals.side_effects)",
            False,
        )
    return None


def _tool_mode(modes: Mapping[str, str], name: str) -> str | None:
    if name in modes:
        return modes[name]
    # The most specific (longest) matching glob wins: "mcp.crm.*" beats "mcp.*".
    matching = [p for p in modes if fnmatch.fnmatchcase(name, p)]
    return modes[max(matching, key=len)] if matching else None
