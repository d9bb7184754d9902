"""The evaluator: a constitution and a policy document compiled once, then deciding requests without I/O.

Owns: `EvalRequest`, `Reason`, `Decision`, `CompiledPolicy` (`compile`, `evaluate`, `scan_text`) and
`CompiledRule` / `ScanText`, which the stream guard's incremental scan drives.
May import: core, policy.document, policy.detectors, stdlib. Never: db, I/O, api.

Semantics (shared spec, issue 5): a rule applies when its `actions` is empty or names the action. The
constitution's rules and the tenant policy's rules are scored apart, each as 1 - prod(1 - weight) over its
matched deny-type rules, against the policy's threshold; either level at or above it denies, and the
reported score is the higher of the two. An allow_list rule that matches (at either level) sets the
tenant policy's score to 0 and replaces its reasons with one `allowed` reason; it never lifts a
constitution denial. Severity is the highest among matched deny-type rules ("none" without any).

Everything is compiled in `compile`: each keywords rule becomes one regular expression (a trie of its
words, `detectors.KeywordMatcher`), globs become one anchored alternation per rule, regexes are
compiled with their flags. An evaluation runs each applicable content rule once over the text; PII
detectors run once per evaluation even when several rules use them; at most 20 matches are kept per
rule and 50 reasons per decision. Cheap exact prefilters skip most rules on text they cannot match: a
regex whose every match contains one of a few literals (`document.required_literals`) runs only if
one occurs (a substring search, ~50x cheaper), a keywords list only if one of its words' first tokens
is among the text's tokens. Both look in the case-folded text for case-insensitive rules, which is
sound because folding equates everything `re.IGNORECASE` does (`detectors.fold`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from somaagent.policy.detectors import (
    DETECTOR_MAX_CHARS,
    DETECTORS,
    KeywordMatcher,
    Span,
    casefold_in_place,
    word_tokens,
)
from somaagent.policy.document import SEVERITIES, PolicyDocument, Rule, pattern_max_width, required_literals

MAX_REASONS = 50
MAX_MATCHES_PER_RULE = 20
CONSTITUTION_PREFIX = "constitution:"
_SEVERITY_RANK = {name: i for i, name in enumerate(SEVERITIES)}
_PII_MESSAGES = {
    "email": "content contains an e-mail address",
    "phone": "content contains a phone number",
    "card": "content contains a payment card number",
    "secret": "content contains a secret (an API key, token or private key)",
}
_CONTENT_KINDS = frozenset({"regex", "keywords", "pii"})


@dataclass(frozen=True, slots=True)
class EvalRequest:
    """What is being decided: an action by a subject, on a resource, with content and context
    (`capabilities`: list[str], `model`, `tool`, `side_effect`, ...)."""

    action: str
    subject: str
    resource: str | None = None
    content: str | None = None
    context: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Reason:
    """One match: the rule kind (or `pii.<detector>`, `allowed`), the rule, a message, and the span
    `[start, end)` in the content for content matches."""

    code: str
    rule: str
    message: str
    span: tuple[int, int] | None = None

    def to_json(self) -> dict[str, Any]:
        """`{"code", "rule", "message", "span": [s, e] | None}`."""
        span = list(self.span) if self.span is not None else None
        return {"code": self.code, "rule": self.rule, "message": self.message, "span": span}


@dataclass(frozen=True, slots=True)
class Decision:
    """Allowed or not, with the score, the highest severity and the reasons, and what decided it."""

    allowed: bool
    score: float
    severity: str
    reasons: tuple[Reason, ...]
    constitution_hash: str
    policy_version: int

    def to_json(self) -> dict[str, Any]:
        """The body of a `POST /v1/policy/evaluate` response."""
        return {
            "allowed": self.allowed,
            "score": self.score,
            "severity": self.severity,
            "reasons": [reason.to_json() for reason in self.reasons],
            "constitution_hash": self.constitution_hash,
            "policy_version": self.policy_version,
        }


# --- compiling ---------------------------------------------------------------------------------------


def _value_matcher(values: Sequence[str]) -> Callable[[str], bool]:
    """Exact values through a set, globs (`*` = any run of characters) through one anchored regex."""
    exact = frozenset(v for v in values if "*" not in v)
    globs = [re.escape(v).replace(r"\*", ".*") for v in values if "*" in v]
    if not globs:
        return exact.__contains__
    pattern = re.compile("|".join(globs), re.DOTALL)
    return lambda value: value in exact or pattern.fullmatch(value) is not None


@dataclass(slots=True)
class ScanText:
    """The text of one evaluation (or one stream buffer), with what several rules share, computed on
    first use: its case-folded form, its word tokens and the PII detectors' spans."""

    text: str
    _folded: str | None = None
    _folded_done: bool = False
    _pii: dict[tuple[str, int], list[Span]] = field(default_factory=dict)
    _tokens: dict[tuple[bool, int], frozenset[str]] = field(default_factory=dict)

    def folded(self) -> str | None:
        """`casefold_in_place(text)`, computed once."""
        if not self._folded_done:
            self._folded = casefold_in_place(self.text)
            self._folded_done = True
        return self._folded

    def tokens(self, folded: bool, start: int) -> frozenset[str] | None:
        """`word_tokens` of the (folded) text from `start`, computed once; None when not foldable."""
        key = (folded, start)
        if key not in self._tokens:
            target = self.folded() if folded else self.text
            if target is None:
                return None
            self._tokens[key] = word_tokens(target, start)
        return self._tokens[key]

    def detect(self, name: str, start: int) -> list[Span]:
        """The named PII detector's spans from `start`, computed once per text."""
        key = (name, start)
        if key not in self._pii:
            self._pii[key] = DETECTORS[name](self.text, start, MAX_MATCHES_PER_RULE)
        return self._pii[key]


Found = tuple[int, int, str, str]  # start, end, reason code, message


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """One rule, compiled: its label (`constitution:` + id for constitution rules) and matchers."""

    rule: Rule
    label: str
    constitution: bool
    actions: frozenset[str] | None
    weight: float
    rank: int
    values: Callable[[str], bool] | None = None
    regex: re.Pattern[str] | None = None
    # Literals one of which every regex match contains (and whether to look in the folded text).
    required: tuple[tuple[str, ...], bool] | None = None
    keywords: KeywordMatcher | None = None
    max_chars: int | None = None  # longest content match, None when unbounded (content rules)

    @classmethod
    def of(cls, rule: Rule, constitution: bool) -> CompiledRule:
        values = rule.values if rule.values is not None else rule.models
        regex = keywords = required = None
        max_chars: int | None = None
        if rule.pattern is not None:
            flags = re.IGNORECASE if rule.ignore_case else 0
            regex = re.compile(rule.pattern, flags)
            required = required_literals(rule.pattern, flags)
            max_chars = pattern_max_width(rule.pattern)
        if rule.words is not None:
            keywords = KeywordMatcher(rule.words, rule.ignore_case)
            max_chars = keywords.max_chars
        if rule.detectors is not None:
            max_chars = max(DETECTOR_MAX_CHARS[name] for name in rule.detectors)
        return cls(
            rule=rule,
            label=(CONSTITUTION_PREFIX if constitution else "") + rule.id,
            constitution=constitution,
            actions=frozenset(rule.actions) if rule.actions else None,
            weight=rule.weight,
            rank=_SEVERITY_RANK[rule.severity],
            values=_value_matcher(values) if values is not None else None,
            regex=regex,
            required=required,
            keywords=keywords,
            max_chars=max_chars,
        )

    def find(self, content: ScanText, start: int) -> list[Found]:
        """Content matches (regex, keywords, pii) starting at or after `start`."""
        rule = self.rule
        if self.regex is not None:
            if self.required is not None:
                literals, folded = self.required
                target = content.folded() if folded else content.text
                # A text holding none of the literals cannot match (folded: only when positions hold).
                if target is not None and all(target.find(literal, start) == -1 for literal in literals):
                    return []
            found = []
            for match in self.regex.finditer(content.text, start):
                if match.end() > match.start():
                    found.append(
                        (*match.span(), "regex", rule.message or "content matches the rule's pattern")
                    )
                    if len(found) >= MAX_MATCHES_PER_RULE:
                        break
            return found
        if self.keywords is not None:
            return [
                (
                    s,
                    e,
                    "keywords",
                    rule.message or f"content contains the listed word {content.text[s:e][:60]!r}",
                )
                for s, e in self.keywords.find(
                    content.text,
                    content.folded() if self.keywords.ignore_case else None,
                    start,
                    MAX_MATCHES_PER_RULE,
                    content.tokens(self.keywords.ignore_case, start),
                )
            ]
        found = []
        for name in rule.detectors or ():
            message = rule.message or _PII_MESSAGES[name]
            found.extend((s, e, f"pii.{name}", message) for s, e in content.detect(name, start))
        found.sort()
        return found[:MAX_MATCHES_PER_RULE]

    def match_attributes(self, request: EvalRequest) -> Reason | None:
        """The reason this attribute rule (lists, capability, side effect, model) matches, if it does."""
        rule = self.rule
        kind = rule.kind
        if kind in ("deny_list", "allow_list"):
            assert rule.field is not None and self.values is not None
            value = _field_value(request, rule.field)
            if value is None or not self.values(value):
                return None
            listed = "deny list" if kind == "deny_list" else "allow list"
            return Reason(
                "allowed" if kind == "allow_list" else kind,
                self.label,
                rule.message or f"{rule.field} {value[:80]!r} is on the {listed} of rule {rule.id}",
            )
        context = request.context
        if kind == "capability":
            held = _capabilities(context.get("capabilities"))
            if rule.requires in held:
                return None
            return Reason(
                kind, self.label, rule.message or f"the caller lacks the capability {rule.requires!r}"
            )
        if kind == "side_effect":
            effect = context.get("side_effect")
            if not isinstance(effect, str) or effect not in (rule.classes or ()):
                return None
            return Reason(kind, self.label, rule.message or f"tools with {effect} side effects are denied")
        if kind == "model_allowlist":
            model = context.get("model")
            if not isinstance(model, str) or (self.values is not None and self.values(model)):
                return None
            return Reason(
                kind, self.label, rule.message or f"model {model[:80]!r} is not one of the allowed models"
            )
        return None


def _field_value(request: EvalRequest, name: str) -> str | None:
    if name == "subject":
        return request.subject
    if name == "action":
        return request.action
    if name == "resource":
        return request.resource
    value = request.context.get(name)  # model, tool
    return value if isinstance(value, str) else None


def _capabilities(raw: Any) -> frozenset[str]:
    if isinstance(raw, str):
        return frozenset((raw,))
    if isinstance(raw, Iterable):
        return frozenset(item for item in raw if isinstance(item, str))
    return frozenset()


@dataclass(frozen=True, slots=True)
class _ForAction:
    """The rules that apply to one action, split the way evaluation walks them."""

    allow: tuple[CompiledRule, ...]  # allow_list rules of both levels
    constitution_attributes: tuple[CompiledRule, ...]
    constitution_content: tuple[CompiledRule, ...]
    policy_attributes: tuple[CompiledRule, ...]
    policy_content: tuple[CompiledRule, ...]


# --- deciding ----------------------------------------------------------------------------------------

Matched = list[tuple[CompiledRule, list[Reason]]]


class CompiledPolicy:
    """A constitution plus a tenant's policy document, compiled; `evaluate` is pure and does no I/O."""

    document: PolicyDocument
    constitution_hash: str
    policy_version: int

    def __init__(
        self,
        rules: Sequence[CompiledRule],
        document: PolicyDocument,
        constitution_hash: str,
        policy_version: int,
    ) -> None:
        self._rules = tuple(rules)
        self.document = document
        self.constitution_hash = constitution_hash
        self.policy_version = policy_version
        self._by_action: dict[str, _ForAction] = {}

    @classmethod
    def compile(
        cls,
        constitution_rules: list[Rule],
        document: PolicyDocument,
        constitution_hash: str,
        policy_version: int,
    ) -> CompiledPolicy:
        """Compile every rule once (regexes, keyword tries, globs); evaluations then only match."""
        rules = [CompiledRule.of(rule, True) for rule in constitution_rules]
        rules += [CompiledRule.of(rule, False) for rule in document.rules]
        return cls(rules, document, constitution_hash, policy_version)

    def evaluate(self, request: EvalRequest) -> Decision:
        """Decide one request against the constitution and the policy."""
        rules = self._for(request.action)
        content = ScanText(request.content) if request.content else None
        allow = [reason for rule in rules.allow if (reason := rule.match_attributes(request)) is not None]
        constitution = self._matched(
            rules.constitution_attributes, rules.constitution_content, request, content
        )
        policy: Matched = []
        if not allow:
            policy = self._matched(rules.policy_attributes, rules.policy_content, request, content)
        return self.decide(constitution, policy, allow)

    def scan_text(
        self, action: str, text: str, context: Mapping[str, Any], *, subject: str | None = None
    ) -> Decision:
        """Decide `text` by the content rules only (regex, keywords, pii) that apply to `action`; an
        allow_list on `subject` (when given) lifts the policy's content rules as in `evaluate`."""
        rules, allow = self.content_rules(action, context, subject=subject)
        request = EvalRequest(action=action, subject=subject or "", context=context)
        matched = self._matched((), rules, request, ScanText(text) if text else None)
        constitution = [entry for entry in matched if entry[0].constitution]
        policy = [entry for entry in matched if not entry[0].constitution]
        return self.decide(constitution, policy, allow)

    def content_rules(
        self, action: str, context: Mapping[str, Any], *, subject: str | None = None
    ) -> tuple[tuple[CompiledRule, ...], list[Reason]]:
        """The content rules that apply to `action` (the policy's only when no allow_list matches),
        and the allow_list reasons; allow_list rules on `subject` count only when it is given."""
        rules = self._for(action)
        request = EvalRequest(action=action, subject=subject or "", context=context)
        allow = [
            reason
            for rule in rules.allow
            if (subject is not None or rule.rule.field != "subject")
            and (reason := rule.match_attributes(request)) is not None
        ]
        return rules.constitution_content + (() if allow else rules.policy_content), allow

    def decide(self, constitution: Matched, policy: Matched, allow: Sequence[Reason]) -> Decision:
        """The decision from matched rules of each level (and allow_list reasons, which void `policy`)."""
        threshold = self.document.threshold
        constitution_score = _score(constitution)
        policy_score = 0.0 if allow else _score(policy)
        matched = constitution + ([] if allow else policy)
        rank = max((rule.rank for rule, _ in matched), default=0)
        reasons = [reason for _, found in constitution for reason in found] + list(allow)
        if not allow:
            reasons += [reason for _, found in policy for reason in found]
        return Decision(
            allowed=constitution_score < threshold and policy_score < threshold,
            score=max(constitution_score, policy_score),
            severity=SEVERITIES[rank],
            reasons=tuple(reasons[:MAX_REASONS]),
            constitution_hash=self.constitution_hash,
            policy_version=self.policy_version,
        )

    def _for(self, action: str) -> _ForAction:
        cached = self._by_action.get(action)
        if cached is not None:
            return cached
        applying = [r for r in self._rules if r.actions is None or action in r.actions]

        def pick(constitution: bool, content: bool) -> tuple[CompiledRule, ...]:
            return tuple(
                r
                for r in applying
                if r.constitution == constitution
                and r.rule.kind != "allow_list"
                and (r.rule.kind in _CONTENT_KINDS) == content
            )

        split = _ForAction(
            allow=tuple(r for r in applying if r.rule.kind == "allow_list"),
            constitution_attributes=pick(True, False),
            constitution_content=pick(True, True),
            policy_attributes=pick(False, False),
            policy_content=pick(False, True),
        )
        if len(self._by_action) >= 256:  # actions are caller-chosen strings: keep the memo bounded
            self._by_action.clear()
        self._by_action[action] = split
        return split

    @staticmethod
    def _matched(
        attributes: Sequence[CompiledRule],
        content_rules: Sequence[CompiledRule],
        request: EvalRequest,
        content: ScanText | None,
    ) -> Matched:
        matched: Matched = []
        for rule in attributes:
            reason = rule.match_attributes(request)
            if reason is not None:
                matched.append((rule, [reason]))
        if content is not None:
            for rule in content_rules:
                found = rule.find(content, 0)
                if found:
                    matched.append(
                        (rule, [Reason(code, rule.label, msg, (s, e)) for s, e, code, msg in found])
                    )
        return matched


def _score(matched: Matched) -> float:
    remaining = 1.0
    for rule, _ in matched:
        remaining *= 1.0 - rule.weight
    # Rounded so that 0.3 and 0.3 give 0.51, not 0.5099999999999998, against a threshold.
    return round(1.0 - remaining, 9)
