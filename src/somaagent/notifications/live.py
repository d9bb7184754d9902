"""The live hub of one replica: its open notification sockets, and which fan-out messages each gets.

A fan-out message is `{tenant_id, target, audience, notification}`: `target` is `user:<id>` (that
person's sockets) or `tenant` (the tenant's sockets that are no person's, i.e. API keys; `admins`
notifications only to those that may send notifications). Nothing crosses tenants.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from somaagent.notifications.consumer import TENANT_SOCKETS

log = logging.getLogger(__name__)

QUEUE_SIZE = 256  # per socket: a client that stops reading loses its oldest pushes, not the replica's memory


@dataclass(eq=False)
class Subscriber:
    """One open socket: who holds it and the pushes waiting for it."""

    tenant_id: str
    user_id: str | None
    is_admin: bool
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))

    def wants(self, target: str, audience: str) -> bool:
        """Whether a push for `target` reaches this socket."""
        if self.user_id is not None:
            return target == f"user:{self.user_id}"
        return target == TENANT_SOCKETS and (audience != "admins" or self.is_admin)


def fanout_message(tenant_id: str, target: str, audience: str, notification: dict[str, Any]) -> bytes:
    """What the delivery worker publishes for one websocket delivery."""
    body = {"tenant_id": tenant_id, "target": target, "audience": audience, "notification": notification}
    return orjson.dumps(body)


class LiveHub:
    """Routes fan-out messages to this replica's sockets."""

    def __init__(self) -> None:
        self._by_tenant: dict[str, set[Subscriber]] = defaultdict(set)

    @property
    def sockets(self) -> int:
        """How many sockets are open here."""
        return sum(len(s) for s in self._by_tenant.values())

    @contextlib.contextmanager
    def subscribe(self, tenant_id: str, user_id: str | None, is_admin: bool) -> Iterator[Subscriber]:
        """Register a socket for as long as the block runs."""
        subscriber = Subscriber(tenant_id, user_id, is_admin)
        self._by_tenant[tenant_id].add(subscriber)
        try:
            yield subscriber
        finally:
            peers = self._by_tenant.get(tenant_id)
            if peers is not None:
                peers.discard(subscriber)
                if not peers:
                    del self._by_tenant[tenant_id]

    async def receive(self, message: bytes) -> None:
        """A fan-out message: queue its notification for every socket it is for."""
        try:
            body = orjson.loads(message)
            tenant_id, target, audience = body["tenant_id"], body["target"], body["audience"]
            notification = body["notification"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("ignored a malformed notification fan-out message")
            return
        push = {"type": "notification", "notification": notification}
        for subscriber in list(self._by_tenant.get(tenant_id, ())):
            if not subscriber.wants(target, audience):
                continue
            if subscriber.queue.full():
                subscriber.queue.get_nowait()  # drop the oldest: the backlog still has it
            subscriber.queue.put_nowait(push)
