"""A real WebSocket client for `/v1/notifications/ws` (the `websockets` library, synchronous)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from websockets.sync.client import ClientConnection, connect


class Socket:
    """An open notification socket; `ready` is the server's first message."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection
        self.ready: dict[str, Any] = json.loads(connection.recv(timeout=10))
        assert self.ready["type"] == "ready", self.ready

    def next_notification(self, timeout: float = 10) -> dict[str, Any]:
        """The next pushed notification; TimeoutError when none comes."""
        message = json.loads(self.connection.recv(timeout=timeout))
        assert message["type"] == "notification", message
        notification: dict[str, Any] = message["notification"]
        return notification

    def wait_for(self, notification_id: str, timeout: float = 10) -> dict[str, Any]:
        """Pushes until the one with `notification_id`."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{notification_id} was not pushed within {timeout}s")
            try:
                found = self.next_notification(left)
            except TimeoutError:
                continue
            if found["id"] == notification_id:
                return found

    def pushed_within(self, seconds: float) -> list[dict[str, Any]]:
        """Every notification pushed in the next `seconds`."""
        found = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                found.append(self.next_notification(left))
            except TimeoutError:
                break
        return found


def socket_url(base_url: str, query: str = "") -> str:
    return base_url.replace("http://", "ws://", 1) + "/v1/notifications/ws" + query


@contextmanager
def open_socket(base_url: str, token: str | None = None, *, query: str = "") -> Iterator[Socket]:
    """A notification socket authenticated with the `authorization` header (or the query, if given)."""
    headers = {"authorization": f"Bearer {token}"} if token else None
    with connect(socket_url(base_url, query), additional_headers=headers, proxy=None, open_timeout=10) as ws:
        yield Socket(ws)
