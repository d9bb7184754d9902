"""PLACEHOLDER (issue 6 in progress): the notifications routes and the component the app factory builds."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import APIRouter

from somaagent.api.composition import Check, Platform
from somaagent.events.consumers import ConsumerSpec

router = APIRouter(tags=["notifications"])


@dataclass
class NotificationsComponent:
    """What the app factory wires: consumer groups, readiness checks, a lifecycle."""

    consumers: list[ConsumerSpec] = field(default_factory=list)
    readiness: list[tuple[str, Check]] = field(default_factory=list)

    async def start(self) -> None:
        """Start background work."""

    async def close(self) -> None:
        """Stop background work."""


def build_notifications(platform: Platform) -> NotificationsComponent:
    """The notifications component of this process."""
    del platform
    return NotificationsComponent()
