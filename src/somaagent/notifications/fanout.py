"""Fan-out of live pushes to every replica: the delivery worker publishes a message once, each
replica's hub hands it to its own sockets.

`LocalFanout` is this process only (one replica); `RedisFanout` is Redis pub/sub, so a notification
delivered by one replica reaches a socket held by any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

Receiver = Callable[[bytes], Awaitable[None]]


class FanoutUnavailable(Exception):
    """The fan-out cannot take a message now; the delivery is retried later."""


class Fanout(Protocol):
    """Publish to every replica; deliver what any replica publishes to `receive`."""

    async def start(self, receive: Receiver) -> None:
        """Begin receiving (every message published from now on reaches `receive`)."""
        ...

    async def publish(self, message: bytes) -> None:
        """Send `message` to every replica (this one included); `FanoutUnavailable` when it cannot."""
        ...

    async def check(self) -> None:
        """Raise when the fan-out is not usable (readiness)."""
        ...

    async def close(self) -> None:
        """Stop receiving and disconnect."""
        ...


class LocalFanout:
    """One process: publishing is receiving."""

    def __init__(self) -> None:
        self._receive: Receiver | None = None

    async def start(self, receive: Receiver) -> None:
        """Remember the receiver."""
        self._receive = receive

    async def publish(self, message: bytes) -> None:
        """Hand `message` to this process's hub."""
        if self._receive is not None:
            await self._receive(message)

    async def check(self) -> None:
        """Always usable."""

    async def close(self) -> None:
        """Nothing to disconnect."""
        self._receive = None


class RedisFanout:
    """Redis pub/sub on one channel. Pub/sub keeps nothing: a replica that is disconnected for a moment
    misses those pushes, which the backlog (`GET /v1/notifications/backlog`) still holds."""

    def __init__(self, url: str, channel: str = "soma:notifications", reconnect_s: float = 1.0) -> None:
        self._redis: Redis = Redis.from_url(url)
        self._channel = channel
        self._reconnect_s = reconnect_s
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    async def start(self, receive: Receiver) -> None:
        """Subscribe in the background; waits briefly for the first subscription so pushes published
        right after start are not missed."""
        self._task = asyncio.create_task(self._listen(receive), name="notifications-fanout")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), timeout=5)

    async def _listen(self, receive: Receiver) -> None:
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                self._subscribed.set()
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        try:
                            await receive(bytes(message["data"]))
                        except Exception:  # one bad message must not stop the subscription
                            log.exception("notification fan-out receiver failed")
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self._subscribed.clear()
                log.warning("notification fan-out lost Redis (%r); reconnecting", exc)
                await asyncio.sleep(self._reconnect_s)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def publish(self, message: bytes) -> None:
        """PUBLISH to every replica's subscription."""
        try:
            await self._redis.publish(self._channel, message)
        except (RedisError, OSError) as exc:
            raise FanoutUnavailable(f"Redis publish failed: {exc!r}") from exc

    async def check(self) -> None:
        """PING Redis."""
        await self._redis.ping()

    async def close(self) -> None:
        """Unsubscribe and disconnect."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._redis.aclose()
