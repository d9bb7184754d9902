"""The stream guard: model output checked while it streams, released only once checked.

Owns: `StreamGuard`, `GuardStep`. May import: policy.evaluator, stdlib.
Never: I/O (the caller emits the decision and counts strikes).

How it works. Output arrives in chunks. The guard keeps the text not yet released; the last
`holdback_chars` of it always stay held, because a match may still be completing there. When at least
a release step (a quarter of the holdback) can be released, the new text is scanned by the content
rules that apply to `model.output`, and only then released up to `holdback_chars` before the end. A
scan is incremental: each rule reads from the first new character minus its own look-back, which is
max(holdback_chars, min(the rule's longest possible match, window_chars / 2)) — a card is at most 40
characters, a keyword list its longest phrase, a regex its `sre` width; unbounded regexes get
window_chars / 2. So a match of up to `holdback_chars`, split over any number of chunks, is whole in
the scan that first sees its last character, and that scan happens before any of it is released:
whatever is released was scanned with at least `holdback_chars` of text to its right, or the stream
had ended. A policy without content rules for `model.output` holds nothing back.

Matches that start in the held tail are not judged yet (the text after them may change them: `bomb`
may become `bombastic`); the next scan reads them again. Matches accumulate over the stream, so two
weak rules matched far apart add up as they would on the whole text. Once denied, nothing more is
released. Assumptions: a content match longer than `holdback_chars` may have its beginning released
before its end arrives (it is still found, and the stream stopped, when it is at most window_chars / 2
long); longer matches of unbounded regexes are found only when they fit one scan. Spans in a denial
are positions in the whole output.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from somaagent.policy.evaluator import (
    MAX_MATCHES_PER_RULE,
    CompiledPolicy,
    CompiledRule,
    Decision,
    Reason,
    ScanText,
)

ACTION = "model.output"
_LEFT_CONTEXT = 16  # kept before the earliest scan start, so look-behinds and `^` see real text


@dataclass(frozen=True, slots=True)
class GuardStep:
    """What may be shown now (`release`), and the denial if the output was denied."""

    release: str
    denied: Decision | None = None


class StreamGuard:
    """Checks model output while it streams: text is released only once checked; the last
    `holdback_chars` stay held (a match may still be completing); overlapping windows of
    `window_chars` are scanned so matches across chunk borders are found."""

    scanned_chars: int  # how much of the output (from its start) has been scanned

    def __init__(self, policy: CompiledPolicy, subject: str, context: Mapping[str, Any]) -> None:
        settings = policy.document.stream
        self._policy = policy
        self._rules, self._allow = policy.content_rules(ACTION, context, subject=subject)
        # Without content rules nothing can match: nothing needs holding back.
        self._holdback = settings.holdback_chars if self._rules else 0
        self._step = max(1, self._holdback // 4)
        half_window = settings.window_chars // 2
        self._lookbacks = [
            max(self._holdback, min(rule.max_chars or half_window, half_window)) for rule in self._rules
        ]
        self._keep = max(self._lookbacks, default=self._holdback) + _LEFT_CONTEXT
        self._buffer = ""  # the output from position `_base` on
        self._base = 0
        self._released = 0
        self.scanned_chars = 0
        self._found: dict[str, tuple[CompiledRule, list[Reason]]] = {}
        self._seen: set[tuple[str, int, int]] = set()
        self._denied: Decision | None = None
        self._finished = False

    def feed(self, text: str) -> GuardStep:
        """Take the next chunk; returns the text that is now checked and may be shown."""
        if self._denied is not None or self._finished:
            return GuardStep("", self._denied)
        self._buffer += text
        end = self._base + len(self._buffer)
        releasable = end - self._holdback
        if releasable - self._released < self._step:
            return GuardStep("")
        return self._check_and_release(releasable, final=False)

    def finish(self) -> GuardStep:
        """The stream has ended: check and release the held tail."""
        if self._denied is not None or self._finished:
            return GuardStep("", self._denied)
        self._finished = True
        return self._check_and_release(self._base + len(self._buffer), final=True)

    def _check_and_release(self, upto: int, *, final: bool) -> GuardStep:
        end = self._base + len(self._buffer)
        if self._scan(decisive_before=end if final else upto):
            decision = self._policy.decide(
                [entry for entry in self._found.values() if entry[0].constitution],
                [entry for entry in self._found.values() if not entry[0].constitution],
                self._allow,
            )
            if not decision.allowed:
                self._denied = decision
                return GuardStep("", decision)
        release = self._buffer[self._released - self._base : upto - self._base]
        self._released = upto
        keep_from = min(self._released, self.scanned_chars - self._keep)
        if keep_from > self._base:
            self._buffer = self._buffer[keep_from - self._base :]
            self._base = keep_from
        return GuardStep(release)

    def _scan(self, *, decisive_before: int) -> bool:
        """Scan the text after `scanned_chars` (plus each rule's look-back); True if anything new matched.
        A final scan runs even without new text: matches in the tail are judged only then."""
        end = self._base + len(self._buffer)
        fresh = self.scanned_chars - self._base
        self.scanned_chars = end
        if not self._rules or not self._buffer:
            return False
        content = ScanText(self._buffer)
        new = False
        for rule, lookback in zip(self._rules, self._lookbacks, strict=True):
            for s, e, code, message in rule.find(content, max(0, fresh - lookback)):
                start, stop = s + self._base, e + self._base
                if start >= decisive_before:
                    break  # found in order: the rest start later still, and are read again next time
                key = (rule.label, start, stop)
                if key in self._seen:
                    continue
                self._seen.add(key)
                entry = self._found.setdefault(rule.label, (rule, []))
                if len(entry[1]) < MAX_MATCHES_PER_RULE:
                    entry[1].append(Reason(code, rule.label, message, (start, stop)))
                    new = True
        return new
