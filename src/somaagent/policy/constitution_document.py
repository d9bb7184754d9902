"""A constitution document's shape: `{name, principles, rules}`, checked field by field, and the default.

Owns: `DEFAULT_CONSTITUTION`, `DocumentProblem`, `document_problems`, `parse_constitution` and the limits.
May import: core, policy.document (rules are validated by `parse_rules`). Never: db, I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from somaagent.core.errors import InvalidRequest
from somaagent.policy.constitution_signing import canonical_bytes
from somaagent.policy.document import Rule, parse_rules

MAX_NAME_CHARS = 100
MAX_PRINCIPLES = 100
MAX_PRINCIPLE_CHARS = 2000
MAX_DOCUMENT_BYTES = 256 * 1024
_FIELDS = ("name", "principles", "rules")

# In force for every tenant that has not stored one (version 0); signed with the platform key at use.
DEFAULT_CONSTITUTION: dict[str, Any] = {
    "name": "default",
    "principles": [
        "Be helpful and honest: answer what is asked, say when you do not know, and never invent facts, "
        "sources or tool results.",
        "Protect people's privacy: do not reveal or collect personal data beyond what the task needs.",
        "Refuse to help with violence, weapons of mass harm, the abuse of children, or other serious crimes.",
        "Act only within the permissions you were given, and ask a person before actions that change "
        "data or reach outside this system.",
        "Keep each tenant's data within that tenant.",
    ],
    "rules": [],
}


@dataclass(frozen=True, slots=True)
class DocumentProblem:
    """One reason a document is refused: the field (`rules[2].pattern`) and what is wrong with it."""

    param: str
    message: str


def _principle_problems(raw: Any) -> list[InvalidRequest]:
    if not isinstance(raw, list):
        return [InvalidRequest("`principles` must be a list of strings", param="principles")]
    if len(raw) > MAX_PRINCIPLES:
        return [InvalidRequest(f"at most {MAX_PRINCIPLES} principles, got {len(raw)}", param="principles")]
    return [
        InvalidRequest(
            f"a principle is a non-empty string of at most {MAX_PRINCIPLE_CHARS} characters",
            param=f"principles[{i}]",
        )
        for i, text in enumerate(raw)
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_PRINCIPLE_CHARS
    ]


def _rule_problems(raw: Any) -> tuple[list[InvalidRequest], list[Rule]]:
    if not isinstance(raw, list):
        return [InvalidRequest("`rules` must be a list of rule objects", param="rules")], []
    not_objects = [
        InvalidRequest("a rule is a JSON object", param=f"rules[{i}]")
        for i, rule in enumerate(raw)
        if not isinstance(rule, dict)
    ]
    if not_objects:
        return not_objects, []
    try:
        return [], parse_rules(raw)
    except InvalidRequest as exc:
        param = exc.param or ""
        if param.startswith("rules"):
            return [exc], []
        param = "rules" + (param if param.startswith("[") or not param else "." + param)
        return [InvalidRequest(exc.message, param=param, code=exc.code)], []


def document_problems(raw: Any) -> tuple[list[InvalidRequest], list[Rule]]:
    """Every problem found in a constitution document (each naming its field), and its parsed rules."""
    if not isinstance(raw, Mapping):
        return [
            InvalidRequest("a constitution is a JSON object {name, principles, rules}", param="document")
        ], []
    problems = [
        InvalidRequest(f"unknown field {key!r}; a constitution has {', '.join(_FIELDS)}", param=str(key))
        for key in raw
        if key not in _FIELDS
    ]
    try:
        size = len(canonical_bytes(raw))
    except InvalidRequest as exc:  # NaN, huge integers, non-string keys: no canonical form to sign
        return [*problems, exc], []
    if size > MAX_DOCUMENT_BYTES:
        problems.append(
            InvalidRequest(f"the document is {size} bytes; at most {MAX_DOCUMENT_BYTES}", param="document")
        )
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS:
        problems.append(
            InvalidRequest(
                f"`name` must be a non-empty string of at most {MAX_NAME_CHARS} characters", param="name"
            )
        )
    problems.extend(_principle_problems(raw.get("principles", [])))
    rule_problems, rules = _rule_problems(raw.get("rules", []))
    return [*problems, *rule_problems], rules


def parse_constitution(raw: Any) -> tuple[list[str], list[Rule]]:
    """A document's principles and validated rules; raises `InvalidRequest` naming the first bad field."""
    problems, rules = document_problems(raw)
    if problems:
        raise problems[0]
    return list(raw.get("principles", [])), rules
