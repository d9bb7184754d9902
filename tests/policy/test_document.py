"""Policy documents: what parses, and for what does not, an InvalidRequest naming the rule and field."""

from __future__ import annotations

import re
from typing import Any

import pytest

from somaagent.core.errors import InvalidRequest
from somaagent.policy.document import (
    MAX_ITEMS,
    MAX_PATTERN_CHARS,
    MAX_RULES,
    SEVERITIES,
    PolicyDocument,
    Rule,
    check_pattern,
    parse_policy,
    parse_rules,
    pattern_max_width,
    required_literals,
)

ONE_OF_EACH: list[dict[str, Any]] = [
    {"id": "banned", "kind": "deny_list", "field": "subject", "values": ["mallory", "bot-*"]},
    {"id": "ops", "kind": "allow_list", "field": "tool", "values": ["calculator"]},
    {"id": "inject", "kind": "regex", "pattern": r"ignore (?:all )?previous instructions", "weight": 0.7},
    {"id": "topics", "kind": "keywords", "words": ["ransomware", "wire fraud"], "ignore_case": False},
    {"id": "pii", "kind": "pii", "detectors": ["email", "card"], "actions": ["chat.input"]},
    {"id": "cap", "kind": "capability", "requires": "chat:use", "severity": "high"},
    {"id": "effects", "kind": "side_effect", "classes": ["external"], "message": "no outside calls"},
    {"id": "models", "kind": "model_allowlist", "models": ["smollm2*"]},
]


def test_a_full_document_parses_with_defaults() -> None:
    document = parse_policy({"rules": ONE_OF_EACH})
    assert [rule.kind for rule in document.rules] == [r["kind"] for r in ONE_OF_EACH]
    assert document.threshold == 0.5 and document.fail_closed is True
    assert document.moderation.threshold == 5 and document.moderation.window_s == 3600
    assert document.approvals.side_effects == ["write", "external"] and document.approvals.ttl_s is None
    assert (document.stream.holdback_chars, document.stream.window_chars) == (64, 2048)
    rule = document.rules[2]
    assert (rule.weight, rule.severity, rule.message, rule.actions, rule.ignore_case) == (
        0.7,
        "medium",
        "",
        [],
        True,
    )
    assert SEVERITIES == ("none", "low", "medium", "high", "critical")


def test_documents_round_trip_through_model_dump() -> None:
    document = parse_policy({"rules": ONE_OF_EACH, "threshold": 0.8, "stream": {"holdback_chars": 32}})
    assert parse_policy(document.model_dump()) == document
    assert parse_policy(document.model_dump(exclude_none=True)) == document
    assert parse_policy(document.model_dump(mode="json")) == document
    assert parse_policy({}) == PolicyDocument()


def test_parse_rules_accepts_a_constitutions_rules() -> None:
    rules = parse_rules(ONE_OF_EACH)
    assert all(isinstance(rule, Rule) for rule in rules) and rules[0].id == "banned"
    assert parse_rules([]) == []


def _refused(raw: dict[str, Any]) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        parse_policy(raw)
    return caught.value


def _rule(**fields: Any) -> dict[str, Any]:
    return {"rules": [{"id": "ok", "kind": "capability", "requires": "x"}, {"id": "bad", **fields}]}


@pytest.mark.parametrize(
    ("raw", "param", "code", "says"),
    [
        (
            _rule(kind="regex", pattern="[a-"),
            "rules[1].pattern",
            "invalid_value",
            "not a valid regular expression",
        ),
        (_rule(kind="regex", pattern="(a+)+$"), "rules[1].pattern", "invalid_value", "exponential time"),
        (
            _rule(kind="regex", pattern=r"(\w+\s?)*x"),
            "rules[1].pattern",
            "invalid_value",
            "nests a repetition",
        ),
        (
            _rule(kind="regex", pattern=r"(\d{1,4})+"),
            "rules[1].pattern",
            "invalid_value",
            "nests a repetition",
        ),
        (_rule(kind="regex", pattern="a*"), "rules[1].pattern", "invalid_value", "can match empty text"),
        (_rule(kind="regex", pattern=r"\b"), "rules[1].pattern", "invalid_value", "can match empty text"),
        (_rule(kind="regex"), "rules[1].pattern", "invalid_value", "a regex rule needs `pattern`"),
        (_rule(kind="regex", pattern="x", words=["y"]), "rules[1].words", "invalid_value", "not `words`"),
        (
            _rule(kind="pii", detectors=["email"], ignore_case=False),
            "rules[1].ignore_case",
            "invalid_value",
            "ignore_case",
        ),
        (_rule(kind="pii", detectors=["ssn"]), "rules[1].detectors[0]", "invalid_value", "'email', 'phone'"),
        (_rule(kind="keywords", words=["ok", "  "]), "rules[1].words[1]", "invalid_value", "non-space"),
        (_rule(kind="keywords", words=[]), "rules[1].words", "invalid_value", "at least 1"),
        (_rule(kind="deny_list", values=["x"]), "rules[1].field", "invalid_value", "needs `field`"),
        (
            _rule(kind="deny_list", field="colour", values=["x"]),
            "rules[1].field",
            "invalid_value",
            "'subject'",
        ),
        (_rule(kind="side_effect", classes=["delete"]), "rules[1].classes[0]", "invalid_value", "'read'"),
        (
            _rule(kind="capability", requires="x", weight=1.5),
            "rules[1].weight",
            "invalid_value",
            "less than or equal",
        ),
        (
            _rule(kind="capability", requires="x", severity="bad"),
            "rules[1].severity",
            "invalid_value",
            "'critical'",
        ),
        (
            _rule(kind="capability", requires="x", colour="red"),
            "rules[1].colour",
            "unknown_parameter",
            "unknown field",
        ),
        (_rule(kind="sorcery"), "rules[1].kind", "invalid_value", "'deny_list'"),
        (
            {"rules": [{"kind": "capability", "requires": "x"}]},
            "rules[0].id",
            "missing_required_parameter",
            "required",
        ),
        ({"rules": ["not a rule"]}, "rules[0]", "invalid_value", "valid dictionary"),
        (
            {"rules": [{"id": "Not Valid", "kind": "capability", "requires": "x"}]},
            "rules[0].id",
            "invalid_value",
            "a-z",
        ),
        ({"threshold": 0}, "threshold", "invalid_value", "greater than 0"),
        ({"threshold": 1.5}, "threshold", "invalid_value", "less than or equal"),
        ({"colour": "red"}, "colour", "unknown_parameter", "unknown field `colour`"),
        (
            {"stream": {"holdback_chars": 4}},
            "stream.holdback_chars",
            "invalid_value",
            "greater than or equal",
        ),
        (
            {"stream": {"holdback_chars": 200, "window_chars": 256}},
            "stream.holdback_chars",
            "invalid_value",
            "half",
        ),
        ({"moderation": {"threshold": 0}}, "moderation.threshold", "invalid_value", "greater than or equal"),
        (
            {"approvals": {"tools": {"shell": "sometimes"}}},
            "approvals.tools.shell",
            "invalid_value",
            "'two_key'",
        ),
    ],
)
def test_invalid_documents_name_the_rule_and_field(
    raw: dict[str, Any], param: str, code: str, says: str
) -> None:
    error = _refused(raw)
    assert error.param == param
    assert error.code == code
    assert says in error.message
    if param.startswith("rules[1]"):
        assert error.message.startswith("rules[1] (id 'bad'): ")


def test_duplicate_rule_ids_are_refused_in_documents_and_rule_lists() -> None:
    rules = [
        {"id": "a", "kind": "capability", "requires": "x"},
        {"id": "b", "kind": "capability", "requires": "y"},
        {"id": "a", "kind": "capability", "requires": "z"},
    ]
    error = _refused({"rules": rules})
    assert error.param == "rules[2].id" and "already used by rules[0]" in error.message
    with pytest.raises(InvalidRequest) as caught:
        parse_rules(rules)
    assert caught.value.param == "rules[2].id" and caught.value.message.startswith("rules[2] (id 'a'): ")


def test_parse_rules_params_are_prefixed_with_rules() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_rules([{"id": "r", "kind": "regex", "pattern": "("}])
    assert caught.value.param == "rules[0].pattern"
    with pytest.raises(InvalidRequest) as caught:
        parse_rules({"id": "r"})  # type: ignore[arg-type]
    assert caught.value.param == "rules"
    with pytest.raises(InvalidRequest):
        parse_policy(["not", "an", "object"])  # type: ignore[arg-type]


def test_bounds() -> None:
    many = [{"id": f"r{i}", "kind": "capability", "requires": "x"} for i in range(MAX_RULES)]
    assert len(parse_policy({"rules": many}).rules) == MAX_RULES
    assert (
        _refused({"rules": [*many, {"id": "one-more", "kind": "capability", "requires": "x"}]}).param
        == "rules"
    )
    with pytest.raises(InvalidRequest):
        parse_rules([*many, {"id": "one-more", "kind": "capability", "requires": "x"}])
    long_pattern = "a" * MAX_PATTERN_CHARS
    assert parse_policy({"rules": [{"id": "p", "kind": "regex", "pattern": long_pattern}]}).rules[0].pattern
    error = _refused({"rules": [{"id": "p", "kind": "regex", "pattern": long_pattern + "a"}]})
    assert error.param == "rules[0].pattern" and "at most 1000" in error.message
    words = [f"w{i}" for i in range(MAX_ITEMS)]
    assert parse_policy({"rules": [{"id": "k", "kind": "keywords", "words": words}]})
    assert (
        _refused({"rules": [{"id": "k", "kind": "keywords", "words": [*words, "x"]}]}).param
        == "rules[0].words"
    )
    values = [f"v{i}" for i in range(MAX_ITEMS + 1)]
    error = _refused({"rules": [{"id": "d", "kind": "deny_list", "field": "tool", "values": values}]})
    assert error.param == "rules[0].values"


def test_several_problems_are_counted_in_the_message() -> None:
    error = _refused({"rules": [{"id": "a", "kind": "regex", "pattern": "("}], "threshold": 7, "x": 1})
    assert "2 more problems" in error.message


@pytest.mark.parametrize(
    "pattern",
    [
        r"(?:[a-z0-9-]+\.)+internal\.example\.com",  # each repetition ends at a dot it cannot match
        r"(\w+,)*end",
        r"(\d+\s)+",
        r"(?:\s+\w+){1,3}",  # bounded, small
        r"(\d{4}-)+\d{4}",  # fixed width inside
        r"(a++)+b",  # possessive: no backtracking
        r"\bignore (?:all )?previous instructions\b",
    ],
)
def test_safe_patterns_are_accepted(pattern: str) -> None:
    check_pattern(pattern)


@pytest.mark.parametrize(
    "pattern",
    [
        r"(a+)+",
        r"(a*)*b",
        r"(.*x){20}",
        r"(?:.+,)+",
        r"(?>(a+)+)",
        r"(?i)(?:[a-z]+K)+",
        r"(a|aa)+c",
        r"(?:foo|bar)+",
    ],
)
def test_catastrophic_looking_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError, match="nests a repetition"):
        check_pattern(pattern)


def test_pattern_width_and_required_literals() -> None:
    assert pattern_max_width(r"\d{3}-\d{2}-\d{4}") == 11
    assert pattern_max_width(r"abc|de") == 3
    assert pattern_max_width(r"a+") is None
    assert required_literals(r"\bignore (?:all )?previous instructions\b", re.IGNORECASE) == (
        ("previous instructions",),
        True,
    )
    assert required_literals(r"(?:previous|prior) instructions", re.IGNORECASE) == ((" instructions",), True)
    assert required_literals(r"(?:union\s+select|drop\s+table)") == (("select", "table"), False)
    assert required_literals(r"(?i:Foo)bar") == (("foo",), True)
    assert required_literals(r"\d+") is None
    assert required_literals(r"[Ii]gnore") == (("gnore",), False)
