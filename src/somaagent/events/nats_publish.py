"""Publishing a batch to JetStream and waiting for the stream's acks with one future for the batch.

Owns: `BatchPublisher`, `StreamRefused`, `NoStream`. May import: nats, orjson. Never: an event, a
topic or the database (the NATS adapter turns events into subjects and bytes).

nats-py's `publish_async` makes a future, a done-callback and (through `wait_for` on its semaphore) a
task per message, which was half of the relay's CPU. Here each message is a plain publish whose reply
subject names its batch and position; the batch's future resolves when every position has answered.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg

_NO_RESPONDERS = "503"  # the status of a reply when no stream listens on the subject


class StreamRefused(Exception):
    """The stream answered a publish with an error (full, or refusing the message)."""


class NoStream(StreamRefused):
    """No stream listens on the subject (the server lost it, or it was deleted)."""


@dataclass(slots=True)
class _Batch:
    remaining: int
    done: asyncio.Future[None]
    answered: set[str] = field(default_factory=set)
    error: StreamRefused | None = None


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to publish: its subject, bytes and headers."""

    subject: str
    payload: bytes
    headers: dict[str, str]


class BatchPublisher:
    """Publishes batches on one connection (rebind after a new connection, not after a reconnect: the
    client restores its subscriptions by itself)."""

    def __init__(self) -> None:
        self._prefix = ""
        self._pending: dict[str, _Batch] = {}
        self._tokens = itertools.count()

    async def bind(self, nc: Client) -> None:
        """Listen for acks on a fresh inbox of `nc`."""
        self._prefix = nc.new_inbox()
        self._pending.clear()
        await nc.subscribe(self._prefix + ".>", cb=self._on_reply)

    async def publish(self, nc: Client, messages: Sequence[Outgoing], timeout_s: float) -> None:
        """Publish `messages` in order and wait until the stream has stored all of them. Raises
        `StreamRefused` (`NoStream`) on an error reply, `TimeoutError` when the acks do not all come."""
        if not messages:
            return
        token = str(next(self._tokens))
        batch = _Batch(len(messages), asyncio.get_running_loop().create_future())
        self._pending[token] = batch
        try:
            reply = f"{self._prefix}.{token}."
            # One connection writes in call order: the stream stores the messages in this order.
            for index, message in enumerate(messages):
                await nc.publish(
                    message.subject, message.payload, reply=reply + str(index), headers=message.headers
                )
            await asyncio.wait_for(batch.done, timeout=timeout_s)
        finally:
            self._pending.pop(token, None)
        if batch.error is not None:
            raise batch.error

    async def _on_reply(self, msg: Msg) -> None:
        token, _, index = msg.subject[len(self._prefix) + 1 :].partition(".")
        batch = self._pending.get(token)
        if batch is None or index in batch.answered:
            return  # a batch already given up on, or a repeated answer
        batch.answered.add(index)
        if msg.headers and msg.headers.get("Status") == _NO_RESPONDERS:
            batch.error = batch.error or NoStream("no stream listens on the subject")
        else:
            try:
                answer = orjson.loads(msg.data)
            except orjson.JSONDecodeError:
                answer = {"error": {"description": f"unreadable ack {msg.data[:200]!r}"}}
            if isinstance(answer, dict) and "error" in answer:
                batch.error = batch.error or StreamRefused(str(answer["error"]))
        batch.remaining -= 1
        if batch.remaining == 0 and not batch.done.done():
            batch.done.set_result(None)
