"""The event catalog: producers' events pass, a wrong type or an unknown version is named, added
optional fields are allowed."""

from __future__ import annotations

from somaagent.events.catalog import check
from somaagent.events.notices import notification_event
from somaagent.events.schemas import (
    AUDIT_EVENTS,
    CONSTITUTION_UPDATED,
    CONVERSATION_EVENTS,
    POLICY_DECISIONS,
    TOOL_CALLS,
    Event,
)
from tests.events.sample_events import usage_event


def event(topic: str, type_: str, data: dict[str, object], version: int = 1) -> Event:
    return Event(topic=topic, type=type_, tenant_id="ten_a", actor="key:k", data=data, version=version)


PRODUCED = [
    usage_event("ten_a"),
    usage_event("ten_a", cached_tokens=3, user_id=None, session_id="ses_1", persona="p", new_field=1),
    notification_event("ten_a", kind="budget.80", severity="warning", message="80 %", dedupe_key="b"),
    event(
        TOOL_CALLS,
        "tool.called",
        {
            "session_id": None,
            "run_id": None,
            "tool": "clock",
            "call_id": None,
            "args_sha256": "a" * 64,
            "duration_ms": 1.5,
            "outcome": "ok",
        },
    ),
    event(
        CONVERSATION_EVENTS,
        "run.completed",
        {
            "session_id": "s",
            "run_id": "r",
            "persona": None,
            "model": "m",
            "status": "completed",
            "reason": None,
            "steps": 2,
            "tool_calls": 1,
            "usage": {"prompt_tokens": 3},
            "duration_ms": 10,
        },
    ),
    event(
        CONVERSATION_EVENTS,
        "run.failed",
        {"session_id": "s", "run_id": "r", "status": "failed", "reason": "interrupted"},
    ),
    event(
        POLICY_DECISIONS,
        "policy.decision",
        {
            "action": "model.input",
            "subject": "key:k",
            "resource": None,
            "scanned": {"chars": 3, "hmac_sha256": "f" * 64},
            "allowed": True,
            "score": 0.0,
            "severity": "none",
            "reasons": [],
            "constitution_hash": "h",
            "policy_version": 1,
        },
    ),
    event(
        CONSTITUTION_UPDATED,
        CONSTITUTION_UPDATED,
        {"tenant_id": "ten_a", "version": 2, "sha256": "h", "previous_sha256": "g", "signing_key_id": "sk"},
    ),
    event(AUDIT_EVENTS, "api_key.revoked", {"key_id": "k", "reason": "creator_changed"}),
    event(AUDIT_EVENTS, "training.call", {"reason": "eval"}),
]


def test_every_producer_shape_passes() -> None:
    assert [check(e) for e in PRODUCED] == [None] * len(PRODUCED)


def test_wrong_types_unknown_versions_and_unknown_types_are_named() -> None:
    assert "prompt_tokens" in (check(usage_event("ten_a", prompt=-1)) or "")
    missing = check(event(TOOL_CALLS, "tool.called", {"tool": "clock"}))
    assert missing is not None and "required" in missing
    bad_severity = notification_event("ten_a", kind="k", severity="info", message="m")
    bad_severity.data["severity"] = "loud"
    assert "severity" in (check(bad_severity) or "")
    assert check(event(AUDIT_EVENTS, "user.created", {}, version=3)) == (
        "unknown version 3 of user.created on audit.events (known: 1)"
    )
    assert check(event(TOOL_CALLS, "tool.exploded", {})) == (
        "no schema for events of type 'tool.exploded' on topic 'tool.calls'"
    )
