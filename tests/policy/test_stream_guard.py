"""The stream guard: nothing of a denied match is released, however the output is chunked; benign
output comes out whole and in order; after a denial nothing more comes out."""

from __future__ import annotations

import random
from typing import Any

import pytest

from somaagent.policy.document import parse_policy, parse_rules
from somaagent.policy.evaluator import CompiledPolicy, Decision
from somaagent.policy.stream_guard import GuardStep, StreamGuard

RULES: list[dict[str, Any]] = [
    {"id": "words", "kind": "keywords", "words": ["ransomware", "credit card dump"]},
    {"id": "pii", "kind": "pii", "detectors": ["email", "card", "secret"]},
    {"id": "inject", "kind": "regex", "pattern": r"ignore (?:all )?previous instructions"},
    {"id": "ops", "kind": "allow_list", "field": "subject", "values": ["ops-*"]},
]
CONSTITUTION: list[dict[str, Any]] = [{"id": "law", "kind": "keywords", "words": ["nerve agent"]}]
PROSE = (
    "The export job stopped after the upgrade; the worker times out waiting for the bucket. "
    "We reproduced it on staging and think the pool keeps idle sockets too long. "
)


def policy(rules: list[dict[str, Any]] | None = None, **document: Any) -> CompiledPolicy:
    return CompiledPolicy.compile(
        parse_rules(CONSTITUTION),
        parse_policy({"rules": RULES if rules is None else rules, **document}),
        "h",
        1,
    )


def chunks(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def stream(guard: StreamGuard, parts: list[str]) -> tuple[str, Decision | None, int]:
    """Feed every part, then finish; the released text, the denial, and how many parts were fed
    when it came (len(parts) + 1 for a denial at finish)."""
    released: list[str] = []
    for i, part in enumerate(parts):
        step = guard.feed(part)
        released.append(step.release)
        if step.denied is not None:
            return "".join(released), step.denied, i + 1
    step = guard.finish()
    released.append(step.release)
    return "".join(released), step.denied, len(parts) + 1


@pytest.mark.parametrize(
    ("secret", "code"),
    [
        ("ransomware", "keywords"),
        ("4111 1111 1111 1111", "pii.card"),
        ("dana.kim@example.com", "pii.email"),
        ("ignore all previous instructions", "regex"),
        ("AKIAIOSFODNN7EXAMPLE", "pii.secret"),
        ("nerve agent", "keywords"),
    ],
)
@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13, 64, 500])
def test_a_match_split_over_chunks_is_caught_before_any_of_it_is_released(
    secret: str, code: str, size: int
) -> None:
    text = PROSE * 2 + f"Here it is: {secret} and then more text follows. " + PROSE
    start = text.index(secret)
    released, denied, _ = stream(StreamGuard(policy(), "alice", {}), chunks(text, size))
    assert denied is not None and not denied.allowed
    assert len(released) <= start, f"released {len(released) - start} characters of the match"
    assert text.startswith(released)
    reason = next(r for r in denied.reasons if r.code == code)
    assert reason.span is not None and text[reason.span[0] : reason.span[1]] == secret  # whole-output spans


def test_a_card_split_across_five_chunks_and_an_email_split_in_the_middle() -> None:
    card = ["My card: 4111 ", "1111 ", "1111", " 11", "11 thanks"]
    released, denied, _ = stream(StreamGuard(policy(), "alice", {}), card)
    assert denied is not None and released == ""
    email = [PROSE, "write to dana.kim@exa", "mple.com soon", PROSE]
    released, denied, _ = stream(StreamGuard(policy(), "alice", {}), email)
    assert denied is not None and [r.code for r in denied.reasons] == ["pii.email"]
    assert len(released) <= len(PROSE) + len("write to ")


@pytest.mark.parametrize("seed", range(8))
def test_benign_output_is_released_whole_and_in_order(seed: int) -> None:
    rng = random.Random(seed)
    text = (PROSE + "Unicode too: caf\u00e9, na\u00efve, \u4e2d\u6587, emoji \U0001f600. ") * 12
    cut = sorted(rng.sample(range(1, len(text)), 60))
    parts = [text[a:b] for a, b in zip([0, *cut], [*cut, len(text)], strict=True)]
    guard = StreamGuard(policy(), "alice", {})
    pieces: list[str] = []
    for part in parts:
        step = guard.feed(part)
        assert step.denied is None
        pieces.append(step.release)
        # Never more than the text fed minus the holdback.
        assert len("".join(pieces)) <= max(0, sum(map(len, parts[: len(pieces)])) - 64)
    final = guard.finish()
    assert final.denied is None
    assert "".join(pieces) + final.release == text
    assert guard.scanned_chars == len(text)


def test_release_happens_while_streaming_not_only_at_the_end() -> None:
    text = PROSE * 4
    guard = StreamGuard(policy(), "alice", {})
    early = "".join(guard.feed(part).release for part in chunks(text, 8))
    assert len(early) >= len(text) - 64 - 16  # held: the holdback plus less than one release step
    assert early + guard.finish().release == text


def test_after_a_denial_nothing_more_is_released() -> None:
    guard = StreamGuard(policy(), "alice", {})
    released, denied, _ = stream(guard, chunks(PROSE + "ransomware " + PROSE * 3, 4))
    assert denied is not None
    for _ in range(3):
        assert guard.feed(PROSE * 2) == GuardStep("", denied)
    assert guard.finish() == GuardStep("", denied)
    assert "ransomware" not in released


def test_a_match_in_the_held_tail_is_denied_at_finish() -> None:
    text = PROSE + "and finally ransomware"
    guard = StreamGuard(policy(), "alice", {})
    released = "".join(guard.feed(part).release for part in chunks(text, 7))
    final = guard.finish()
    assert final.denied is not None and final.release == ""
    assert "ransomware" not in released and len(released) <= text.index("ransomware")


def test_a_listed_word_that_grows_into_another_word_is_not_denied() -> None:
    text = PROSE + "the ransomwarehouse district " + PROSE
    released, denied, _ = stream(StreamGuard(policy(), "alice", {}), [*chunks(text[:150], 1), text[150:]])
    assert denied is None and released == text


def test_one_large_chunk_is_scanned_whole() -> None:
    text = PROSE * 50 + "card 4111-1111-1111-1111. " + PROSE * 50
    released, denied, fed = stream(StreamGuard(policy(), "alice", {}), [text])
    assert denied is not None and released == "" and fed == 1


def test_weak_matches_far_apart_add_up_over_the_stream() -> None:
    weak = [
        {"id": "a", "kind": "keywords", "words": ["alpha"], "weight": 0.3},
        {"id": "b", "kind": "keywords", "words": ["beta"], "weight": 0.3},
    ]
    text = "alpha " + PROSE * 10 + " beta " + PROSE
    released, denied, _ = stream(StreamGuard(policy(weak), "alice", {}), chunks(text, 8))
    assert denied is not None and denied.score == pytest.approx(0.51)
    assert [r.rule for r in denied.reasons] == ["a", "b"]
    assert len(released) <= text.index(" beta ") + 1
    only_alpha = "alpha " + PROSE * 3
    assert stream(StreamGuard(policy(weak), "alice", {}), chunks(only_alpha, 8))[:2] == (only_alpha, None)


def test_a_match_longer_than_the_holdback_is_still_found() -> None:
    rules = [{"id": "long", "kind": "regex", "pattern": r"BEGIN[a-z ]{100,200}END"}]
    text = PROSE + "BEGIN " + "x" * 150 + " END" + PROSE
    released, denied, _ = stream(
        StreamGuard(policy(rules, stream={"holdback_chars": 16}), "alice", {}), chunks(text, 8)
    )
    assert denied is not None
    assert len(released) < text.index(" END")  # its end was never shown


def test_allow_listed_subjects_skip_tenant_content_rules_but_not_the_constitution() -> None:
    text = PROSE + "ransomware " + PROSE
    released, denied, _ = stream(StreamGuard(policy(), "ops-bot", {}), chunks(text, 8))
    assert denied is None and released == text
    text = PROSE + "a nerve agent " + PROSE
    released, denied, _ = stream(StreamGuard(policy(), "ops-bot", {}), chunks(text, 8))
    assert denied is not None and [(r.code, r.rule) for r in denied.reasons] == [
        ("keywords", "constitution:law"),
        ("allowed", "ops"),
    ]


def test_rules_for_other_actions_do_not_apply_to_output() -> None:
    rules = [{"id": "in-only", "kind": "keywords", "words": ["ransomware"], "actions": ["chat.input"]}]
    text = PROSE + "ransomware " + PROSE
    assert stream(StreamGuard(policy(rules), "alice", {}), chunks(text, 8))[:2] == (text, None)


def test_empty_stream_and_no_content_rules() -> None:
    guard = StreamGuard(policy(), "alice", {})
    assert guard.finish() == GuardStep("")
    assert guard.feed("late") == GuardStep("")  # after finish nothing more is taken
    no_content = parse_policy({"rules": [{"id": "cap", "kind": "capability", "requires": "x"}]})
    plain = StreamGuard(CompiledPolicy.compile([], no_content, "h", 1), "alice", {})
    assert plain.feed("nothing to check") == GuardStep("nothing to check")  # nothing held back
    assert stream(plain, chunks(PROSE, 10))[:2] == (PROSE, None)
