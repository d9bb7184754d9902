"""The policy document: rules, the deny threshold, the fail mode, moderation, approvals and stream checks.

Owns: `Rule`, `PolicyDocument` and its settings models, `parse_rules` / `parse_policy` (every problem an
`InvalidRequest` naming the rule and field), and the checks a regular expression passes before it is
accepted (`pattern_max_width` is what the stream guard relies on, `required_literals` lets the
evaluator skip a regex on text that cannot match it).
May import: core, stdlib, pydantic. Never: db, I/O.

A rule is one flat model (`kind` says which of the optional fields it needs); validation refuses a
rule that lacks its kind's fields or carries another kind's. `None` means "absent", so
`model_dump()` and `model_dump(exclude_none=True)` both parse back to the same rule.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from somaagent.core.errors import InvalidRequest

Severity = Literal["none", "low", "medium", "high", "critical"]
SEVERITIES: tuple[Severity, ...] = ("none", "low", "medium", "high", "critical")  # lowest first
RuleKind = Literal[
    "deny_list", "allow_list", "regex", "keywords", "pii", "capability", "side_effect", "model_allowlist"
]
RuleField = Literal["subject", "resource", "action", "model", "tool"]
SideEffectClass = Literal["read", "write", "external"]
Detector = Literal["email", "phone", "card", "secret"]

MAX_RULES = 500
MAX_PATTERN_CHARS = 1000
MAX_ITEMS = 1000  # words, values or models of one rule

_RULE_ID = re.compile(r"[a-z0-9_.-]{1,64}")
_Item = Annotated[str, StringConstraints(min_length=1, max_length=256)]
_Word = Annotated[str, StringConstraints(min_length=1, max_length=200)]
_Action = Annotated[str, StringConstraints(min_length=1, max_length=64)]

# The fields each kind needs; every other kind-specific field must be absent.
KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "deny_list": ("field", "values"),
    "allow_list": ("field", "values"),
    "regex": ("pattern",),
    "keywords": ("words",),
    "pii": ("detectors",),
    "capability": ("requires",),
    "side_effect": ("classes",),
    "model_allowlist": ("models",),
}
_KIND_SPECIFIC = ("field", "values", "pattern", "words", "detectors", "requires", "classes", "models")


class DocumentFieldError(ValueError):
    """A validation problem located at `path` below the model that raised it (pydantic's `loc` stops
    at the model for model-level checks; this carries the field on)."""

    def __init__(self, path: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.path = path


# --- regular expressions ---------------------------------------------------------------------------

try:  # the stdlib's own parser (what `re.compile` uses); private, so every use has a fallback
    _sre_parser: Any = importlib.import_module("re._parser")
except ImportError:  # pragma: no cover - Python versions without `re._parser`
    _sre_parser = None

_UNBOUNDED = 1 << 20  # a repeat or width at least this large counts as unbounded
_LARGE_BOUND = 10


def _walk(items: Any) -> list[tuple[str, Any]]:
    """(op name, argument) pairs of one parsed sub-pattern."""
    return [(str(op), av) for op, av in items]


def _children(name: str, av: Any) -> list[Any]:
    """Sub-patterns nested in one parsed node."""
    if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
        return [av[2]]
    if name == "SUBPATTERN":
        return [av[3]]
    if name == "BRANCH":
        return list(av[1])
    if name in ("ASSERT", "ASSERT_NOT"):
        return [av[1]]
    if name == "ATOMIC_GROUP":
        return [av]
    if name == "GROUPREF_EXISTS":
        return [sub for sub in av[1:] if sub is not None]
    return []


_SAMPLE_CHARS = [chr(i) for i in range(128)] + list("\u00a0\u2003\u00e9\u00c9\u0663\u4e2d\u00df")
CharTest = Callable[[str], bool]


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


_CATEGORIES: dict[str, tuple[CharTest, bool]] = {  # name -> (test, negated)
    "CATEGORY_DIGIT": (str.isdigit, False),
    "CATEGORY_NOT_DIGIT": (str.isdigit, True),
    "CATEGORY_SPACE": (str.isspace, False),
    "CATEGORY_NOT_SPACE": (str.isspace, True),
    "CATEGORY_WORD": (_is_word_char, False),
    "CATEGORY_NOT_WORD": (_is_word_char, True),
}


def _member_test(op: str, arg: Any) -> CharTest | None:
    if op == "LITERAL":
        return chr(arg).__eq__
    if op == "RANGE":
        lo, hi = arg
        return lambda ch: lo <= ord(ch) <= hi
    if op == "CATEGORY" and str(arg) in _CATEGORIES:
        test, negated = _CATEGORIES[str(arg)]
        return (lambda ch: not test(ch)) if negated else test
    return None


def _char_test(name: str, av: Any) -> CharTest | None:
    """A predicate for a node that matches exactly one character, else None (not one character, or
    a form this analysis does not model)."""
    if name in ("LITERAL", "NOT_LITERAL"):
        literal = _member_test("LITERAL", av)
        assert literal is not None
        return literal if name == "LITERAL" else (lambda ch: not literal(ch))
    if name == "ANY":
        return lambda ch: ch != "\n"
    if name != "IN":
        return None
    negate = bool(av) and str(av[0][0]) == "NEGATE"
    tests = [_member_test(str(op), arg) for op, arg in (av[1:] if negate else av)]
    if any(test is None for test in tests):
        return None
    known = [test for test in tests if test is not None]
    return lambda ch: any(test(ch) for test in known) != negate


def _disjoint(first: tuple[str, Any], second: tuple[str, Any]) -> bool:
    """Whether two one-character nodes match no character in common (in any case of it)."""
    a, b = _char_test(*first), _char_test(*second)
    if a is None or b is None:
        return False
    for ch in _SAMPLE_CHARS:
        variants = [v for v in (ch, ch.lower(), ch.upper()) if len(v) == 1]
        if any(a(v) for v in variants) and any(b(v) for v in variants):
            return False
    return True


def _delimited(body: Any, following: tuple[str, Any] | None) -> bool:
    r"""A repeat of one character class followed by a character it cannot match (`[a-z]+\.`, `\d+\s`):
    where each repetition ends is fixed, so an enclosing repeat cannot split the text many ways."""
    items = _walk(body)
    while len(items) == 1 and items[0][0] == "SUBPATTERN":
        items = _walk(items[0][1][3])
    return following is not None and len(items) == 1 and _disjoint(items[0], following)


def _has_repeat(items: Any, *, unbounded_only: bool) -> bool:
    """Whether `items` holds a backtracking repeat of variable count (or an unbounded one) whose end
    is not fixed by the character after it."""
    nodes = _walk(items)
    for i, (name, av) in enumerate(nodes):
        if name in ("MAX_REPEAT", "MIN_REPEAT"):
            lo, hi, body = av
            varies = hi >= _UNBOUNDED if unbounded_only else lo != hi
            if varies and not _delimited(body, nodes[i + 1] if i + 1 < len(nodes) else None):
                return True
        if any(_has_repeat(sub, unbounded_only=unbounded_only) for sub in _children(name, av)):
            return True
    return False


def _has_branch(items: Any) -> bool:
    """Whether `items` holds an alternation of more than single characters (`foo|bar`, `a|aa`)."""
    for name, av in _walk(items):
        if name == "BRANCH" or any(_has_branch(sub) for sub in _children(name, av)):
            return True
    return False


def _nested_quantifier(items: Any) -> bool:
    """Whether a repeated group contains another repetition, or alternatives, that can split the same
    text many ways (`(a+)+`, `(\\w+\\s?)*`, `(\\d{1,4})+`, `(.*x){20}`, `(a|aa)+`): the shapes of
    catastrophic backtracking. Repeated alternatives are refused whether or not they overlap (telling
    overlap apart is hard; a keywords rule or a character class says the same safely);
    `([a-z]+\\.)+` is allowed."""
    for name, av in _walk(items):
        if name in ("MAX_REPEAT", "MIN_REPEAT"):
            hi, body = av[1], av[2]
            if hi >= _UNBOUNDED and _has_repeat(body, unbounded_only=False):
                return True
            if hi >= _LARGE_BOUND and (_has_repeat(body, unbounded_only=True) or _has_branch(body)):
                return True
        if any(_nested_quantifier(sub) for sub in _children(name, av)):
            return True
    return False


def check_pattern(pattern: str) -> None:
    """Raise ValueError, with the reason, for a pattern the evaluator must not run."""
    try:
        re.compile(pattern)
    except re.error as exc:
        where = f" at position {exc.pos}" if exc.pos is not None else ""
        raise ValueError(f"`pattern` is not a valid regular expression: {exc.msg}{where}") from None
    if _sre_parser is None:  # pragma: no cover
        return
    parsed = _sre_parser.parse(pattern)
    if _nested_quantifier(parsed):
        raise ValueError(
            "`pattern` nests a repetition or alternatives inside a repetition (like `(a+)+`, `(\\w+\\s?)*` "
            "or `(a|aa)+`), which can take exponential time on some texts; repeat a fixed-width group, use "
            "a possessive quantifier (`a++`) or an atomic group (`(?>...)`), or list words in a keywords rule"
        )
    if parsed.getwidth()[0] == 0:
        raise ValueError(
            "`pattern` can match empty text (like `a*` or `\\b`), so it would match everywhere; "
            "make it require at least one character"
        )


def pattern_max_width(pattern: str) -> int | None:
    """The longest text `pattern` can match, or None when unbounded (or unknown)."""
    if _sre_parser is None:  # pragma: no cover
        return None
    hi = int(_sre_parser.parse(pattern).getwidth()[1])
    return None if hi >= _UNBOUNDED else hi


def _best(current: list[str] | None, candidate: list[str] | None) -> list[str] | None:
    """The more selective of two literal requirements (longer shortest literal, then fewer)."""
    if candidate is None or not candidate:
        return current
    if current is None:
        return candidate
    return max(current, candidate, key=lambda alts: (min(map(len, alts)), -len(alts)))


def _requirement(items: Any) -> list[str] | None:
    """ASCII literals, one of which every match of `items` contains (None: none found)."""
    best: list[str] | None = None
    run: list[str] = []
    for name, av in [*_walk(items), ("END", None)]:
        if name == "LITERAL" and av < 128:
            run.append(chr(av))
            continue
        if run:
            best = _best(best, ["".join(run)])
            run = []
        if name == "SUBPATTERN":
            best = _best(best, _requirement(av[3]))
        elif name == "ATOMIC_GROUP":
            best = _best(best, _requirement(av))
        elif name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT") and av[0] >= 1:
            best = _best(best, _requirement(av[2]))
        elif name == "BRANCH":
            alternatives = [_requirement(branch) for branch in av[1]]
            if all(alternatives):
                best = _best(best, [lit for alts in alternatives if alts for lit in alts])
    return best


def _adds_ignorecase(items: Any) -> bool:
    for name, av in _walk(items):
        if name == "SUBPATTERN" and av[1] & re.IGNORECASE:
            return True
        if any(_adds_ignorecase(sub) for sub in _children(name, av)):
            return True
    return False


def required_literals(pattern: str, flags: int = 0) -> tuple[tuple[str, ...], bool] | None:
    """Literals one of which occurs in every match of `pattern` (ASCII, case-folded when the pattern
    ignores case anywhere; the bool says so), so a text holding none of them cannot match; None when
    the pattern requires no literal."""
    if _sre_parser is None:  # pragma: no cover
        return None
    parsed = _sre_parser.parse(pattern, flags)
    literals = _requirement(parsed)
    if not literals:
        return None
    ignore_case = bool((parsed.state.flags | flags) & re.IGNORECASE) or _adds_ignorecase(parsed)
    if ignore_case:
        literals = [literal.casefold() for literal in literals]
    return tuple(dict.fromkeys(literals)), ignore_case


# --- models ----------------------------------------------------------------------------------------


class Rule(BaseModel):
    """One rule: when it applies (`actions`), what it matches (`kind` and its fields) and what a match
    weighs (`weight` toward the score, `severity`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    kind: RuleKind
    actions: list[_Action] = Field(default_factory=list, max_length=64)
    weight: float = Field(1.0, ge=0.0, le=1.0, allow_inf_nan=False)
    severity: Severity = "medium"
    message: str = Field("", max_length=500)
    field: RuleField | None = None
    values: list[_Item] | None = Field(None, min_length=1, max_length=MAX_ITEMS)
    pattern: str | None = Field(None, min_length=1, max_length=MAX_PATTERN_CHARS)
    ignore_case: bool = True
    words: list[_Word] | None = Field(None, min_length=1, max_length=MAX_ITEMS)
    detectors: list[Detector] | None = Field(None, min_length=1, max_length=4)
    requires: str | None = Field(None, min_length=1, max_length=128)
    classes: list[SideEffectClass] | None = Field(None, min_length=1, max_length=3)
    models: list[_Item] | None = Field(None, min_length=1, max_length=MAX_ITEMS)

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not _RULE_ID.fullmatch(value):
            raise ValueError(
                f"`id` {value[:70]!r} is not a rule id: use 1-64 characters of a-z, 0-9, '_', '.', '-'"
            )
        return value

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, value: str | None) -> str | None:
        if value is not None:
            check_pattern(value)
        return value

    @field_validator("words")
    @classmethod
    def _check_words(cls, value: list[str] | None) -> list[str] | None:
        for i, word in enumerate(value or ()):
            if not word.strip():
                raise DocumentFieldError((i,), "`words` entries must contain a non-space character")
        return value

    @model_validator(mode="after")
    def _check_kind_fields(self) -> Rule:
        needed = KIND_FIELDS[self.kind]
        for name in needed:
            if getattr(self, name) is None:
                raise DocumentFieldError((name,), f"a {self.kind} rule needs `{name}`")
        for name in _KIND_SPECIFIC:
            if name not in needed and getattr(self, name) is not None:
                takes = ", ".join(f"`{n}`" for n in needed)
                raise DocumentFieldError((name,), f"a {self.kind} rule takes {takes}, not `{name}`")
        if not self.ignore_case and self.kind not in ("regex", "keywords"):
            raise DocumentFieldError(("ignore_case",), f"a {self.kind} rule does not take `ignore_case`")
        return self


class ModerationSettings(BaseModel):
    """Strikes: `threshold` denials of one subject within `window_s` lock it out for `lockout_s`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    threshold: int = Field(5, ge=1, le=10_000)
    window_s: float = Field(3600.0, gt=0, le=366 * 86400, allow_inf_nan=False)
    lockout_s: float = Field(900.0, ge=0, le=366 * 86400, allow_inf_nan=False)


ToolApproval = Literal["always", "never", "two_key"]


def _default_approval_classes() -> list[SideEffectClass]:
    return ["write", "external"]


class ApprovalSettings(BaseModel):
    """Which tool calls need a human: side-effect classes, and per-tool (name or glob) overrides."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    side_effects: list[SideEffectClass] = Field(default_factory=_default_approval_classes, max_length=3)
    tools: dict[_Item, ToolApproval] = Field(default_factory=dict, max_length=MAX_ITEMS)
    ttl_s: float | None = Field(None, gt=0, le=30 * 86400, allow_inf_nan=False)


class StreamSettings(BaseModel):
    """How model output is checked while it streams (see `stream_guard.StreamGuard`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    holdback_chars: int = Field(64, ge=8, le=4096)
    window_chars: int = Field(2048, ge=256, le=65536)

    @model_validator(mode="after")
    def _check_holdback(self) -> StreamSettings:
        if self.holdback_chars * 2 > self.window_chars:
            raise DocumentFieldError(
                ("holdback_chars",),
                f"`holdback_chars` ({self.holdback_chars}) must be at most half of `window_chars` "
                f"({self.window_chars}): each window re-reads that much already-checked text",
            )
        return self


class PolicyDocument(BaseModel):
    """A tenant's policy: rules, the score at which a request is denied, and the settings beside them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: list[Rule] = Field(default_factory=list, max_length=MAX_RULES)
    threshold: float = Field(0.5, gt=0.0, le=1.0, allow_inf_nan=False)
    fail_closed: bool = True
    moderation: ModerationSettings = Field(default_factory=ModerationSettings)
    approvals: ApprovalSettings = Field(default_factory=ApprovalSettings)
    stream: StreamSettings = Field(default_factory=StreamSettings)

    @model_validator(mode="after")
    def _check_unique_ids(self) -> PolicyDocument:
        index = _duplicate_id(self.rules)
        if index is not None:
            raise DocumentFieldError(("rules", index, "id"), _duplicate_message(self.rules, index))
        return self


# --- parsing ---------------------------------------------------------------------------------------

_RULES = TypeAdapter(list[Rule])


def _duplicate_id(rules: Sequence[Rule]) -> int | None:
    seen: set[str] = set()
    for i, rule in enumerate(rules):
        if rule.id in seen:
            return i
        seen.add(rule.id)
    return None


def _duplicate_message(rules: Sequence[Rule], index: int) -> str:
    first = next(i for i, rule in enumerate(rules) if rule.id == rules[index].id)
    return f"`id` {rules[index].id!r} is already used by rules[{first}]; rule ids must be unique"


def _param(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _rule_label(loc: Sequence[str | int], raw_rules: Any) -> str | None:
    """`rules[2] (id 'no-cards')` when `loc` points into a rule."""
    if len(loc) < 2 or loc[0] != "rules" or not isinstance(loc[1], int):
        return None
    label = f"rules[{loc[1]}]"
    if isinstance(raw_rules, list) and loc[1] < len(raw_rules) and isinstance(raw_rules[loc[1]], dict):
        rule_id = raw_rules[loc[1]].get("id")
        if isinstance(rule_id, str) and rule_id:
            label += f" (id {rule_id[:70]!r})"
    return label


def _invalid(exc: ValidationError, raw_rules: Any, prefix: tuple[str | int, ...]) -> InvalidRequest:
    """The first problem of a validation error, as an InvalidRequest naming the rule and the field."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc: tuple[str | int, ...] = prefix + tuple(first["loc"])
    kind = first["type"]
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, DocumentFieldError):
        loc += cause.path
    param = _param(loc)
    label = _rule_label(loc, raw_rules)
    where = _param(loc[2:]) if label else param  # the field inside the rule, or the document path
    name = next((str(part) for part in reversed(loc) if isinstance(part, str)), param)
    if kind == "extra_forbidden":
        what, code = f"unknown field `{name}`", "unknown_parameter"
    elif kind == "missing":
        what, code = f"`{name}` is required", "missing_required_parameter"
    elif kind in ("value_error", "assertion_error") and cause is not None:
        what, code = str(cause), "invalid_value"
    else:
        got = first.get("input")
        shown = f" (got {str(got)[:60]!r})" if isinstance(got, str | int | float | bool) else ""
        what = f"`{where}`: {first['msg']}{shown}" if where else f"{first['msg']}{shown}"
        code = "invalid_value"
    message = f"{label}: {what}" if label else what
    if len(errors) > 1:
        message += f" ({len(errors) - 1} more problem{'s' if len(errors) > 2 else ''} in the document)"
    return InvalidRequest(message, param=param, code=code)


def parse_rules(raw: list[dict[str, Any]]) -> list[Rule]:
    """Validate a list of rules (a constitution's); raises InvalidRequest naming the rule and field."""
    if not isinstance(raw, list):
        raise InvalidRequest("`rules` must be a list of rule objects", param="rules", code="invalid_type")
    if len(raw) > MAX_RULES:
        raise InvalidRequest(f"at most {MAX_RULES} rules are allowed, got {len(raw)}", param="rules")
    try:
        rules = _RULES.validate_python(raw)
    except ValidationError as exc:
        raise _invalid(exc, raw, ("rules",)) from None
    index = _duplicate_id(rules)
    if index is not None:
        raise InvalidRequest(
            f"{_rule_label(('rules', index), raw)}: {_duplicate_message(rules, index)}",
            param=f"rules[{index}].id",
            code="invalid_value",
        )
    return rules


def parse_policy(raw: dict[str, Any]) -> PolicyDocument:
    """Validate a policy document; raises InvalidRequest with `param` like `rules[2].pattern`."""
    if not isinstance(raw, dict):
        raise InvalidRequest("the policy document must be a JSON object", code="invalid_type")
    try:
        return PolicyDocument.model_validate(raw)
    except ValidationError as exc:
        raise _invalid(exc, raw.get("rules"), ()) from None
