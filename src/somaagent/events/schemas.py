"""The event envelope `{id, type, tenant_id, occurred_at, actor, data}` and the topic names."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from somaagent.core.clock import utcnow
from somaagent.core.ids import new_id

# Topic names are part of the contract (ARCHITECTURE §6).
MODEL_USAGE = "model.usage"
AUDIT_EVENTS = "audit.events"
CONVERSATION_EVENTS = "conversation.events"
TOOL_CALLS = "tool.calls"
CONSTITUTION_UPDATED = "constitution.updated"
POLICY_DECISIONS = "policy.decisions"
NOTIFICATIONS_OUTBOUND = "notifications.outbound"
WORKFLOW_EVENTS = "workflow.events"
SETTINGS_CHANGED = "settings.changed"
# Poison events of topic T go to T + DEAD_LETTER_SUFFIX, with the error.
DEAD_LETTER_SUFFIX = ".dlq"

SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class Event:
    """One versioned fact, JSON-serializable."""

    topic: str
    type: str
    tenant_id: str | None
    actor: str | None
    data: dict[str, Any]
    id: str = field(default_factory=lambda: new_id("evt"))
    occurred_at: datetime = field(default_factory=utcnow)
    version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        """The wire form."""
        return {
            "id": self.id,
            "type": self.type,
            "version": self.version,
            "tenant_id": self.tenant_id,
            "occurred_at": self.occurred_at.isoformat(),
            "actor": self.actor,
            "data": self.data,
        }
