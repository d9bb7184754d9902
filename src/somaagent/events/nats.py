"""The NATS JetStream adapter of the bus port (nats-py): one file-backed stream for every topic, a durable
push consumer per (group, topic), shared by the group's replicas, that acks only after the runner has
recorded the batch.

Owns: `NatsBus`. May import: events, nats. Never: a domain package, the database (the runner records
outcomes; this module only moves bytes and acks).

Subjects are `<prefix>.<topic>` in the stream `<PREFIX>_EVENTS`. Each publish carries `Nats-Msg-Id`
(the event id): a re-publish of the same event within the stream's duplicate window (2 min) is
stored once. Delivery is at least once: an unacked batch is redelivered and the runner skips what
it already applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Sequence

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

from somaagent.events.bus import BusUnavailable, EventTooLarge
from somaagent.events.consumers import ConsumerSpec
from somaagent.events.nats_publish import BatchPublisher, NoStream, Outgoing, StreamRefused
from somaagent.events.runner import ConsumerRunner
from somaagent.events.schemas import Event
from somaagent.events.wire import EnvelopeInvalid, decode_event, encode_event

log = logging.getLogger(__name__)

_BATCH_MAX = 1000
# How long a short batch waits to fill: the runner's cost is per transaction far more than per event,
# so a few milliseconds of latency buy batches many times larger under load.
_LINGER_S = 0.01
# How often an idle consumer checks that the server still has it.
_IDLE_CHECK_S = 5.0
_BACKOFF_FIRST_S = 0.2
_BACKOFF_MAX_S = 5.0
# Longer than the slowest batch the runner records (retries included), so a batch under way is not
# redelivered to another replica while it is being applied.
_ACK_WAIT_S = 60.0
# Messages pushed and not yet acked, per consumer: what a replica holds in memory at most.
_MAX_ACK_PENDING = 5_000
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def stream_name(prefix: str) -> str:
    """The stream of a prefix: `soma` → `SOMA_EVENTS` (stream names may not contain `.`, `*`, `>`)."""
    return _NAME_UNSAFE.sub("_", prefix).upper() + "_EVENTS"


def durable_name(group: str, topic: str) -> str:
    """The durable consumer of (group, topic), readable and collision-free: `billing-model_usage-1a2b3c4d`.
    The digest also covers the consumer's kind (push), so a pull consumer an earlier release made under
    the same group and topic is left alone rather than refused as the wrong kind."""
    digest = hashlib.sha256(f"{group}\x00{topic}\x00push".encode()).hexdigest()[:8]
    return f"{_NAME_UNSAFE.sub('_', group)}-{_NAME_UNSAFE.sub('_', topic)}-{digest}"


class NatsBus:
    """The bus on NATS JetStream. `publish` pipelines its events and raises `BusUnavailable` within
    `timeout_s` when the server cannot store them; the client reconnects by itself."""

    def __init__(self, url: str, runner: ConsumerRunner, *, prefix: str, timeout_s: float = 5.0) -> None:
        self._url = url
        self._runner = runner
        self._prefix = prefix
        self._stream = stream_name(prefix)
        self._timeout_s = timeout_s
        self._specs: list[ConsumerSpec] = []
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._connect_lock = asyncio.Lock()
        self._stream_ready = False
        self._publisher = BatchPublisher()
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    def subject(self, topic: str) -> str:
        """The subject `topic` is published on."""
        return f"{self._prefix}.{topic}"

    def subscribe(self, spec: ConsumerSpec) -> None:
        """Add a consumer group (before `start`)."""
        self._specs.append(spec)

    async def start(self) -> None:
        """Connect, create the stream, and start a pull loop per (group, topic). A server that is down
        now is not fatal: publishing raises `BusUnavailable` and the loops keep trying."""
        try:
            await self._jetstream()
        except BusUnavailable as exc:
            log.warning("NATS at %s is not reachable yet (%s); retrying in the background", self._url, exc)
        for spec in self._specs:
            for topic in spec.topics:
                self._loops.append(
                    asyncio.create_task(
                        self._consume(spec, topic), name=f"nats-consumer-{spec.group}-{topic}"
                    )
                )

    async def publish(self, events: Sequence[Event]) -> None:
        """Publish `events` in order, pipelined, and wait for every stream ack."""
        if not events:
            return
        try:
            await self._publish_all(events)
        except (TimeoutError, NatsError, OSError, StreamRefused) as exc:
            raise BusUnavailable(f"NATS at {self._url} did not store {len(events)} events: {exc!r}") from exc

    async def _publish_all(self, events: Sequence[Event]) -> None:
        await self._jetstream()
        nc = self._nc
        assert nc is not None
        messages = []
        for event in events:
            payload = encode_event(event)
            if len(payload) > nc.max_payload:
                raise EventTooLarge(
                    f"event {event.id} ({event.type}) is {len(payload)} bytes; NATS takes {nc.max_payload}"
                )
            # Only the dedup id: type and version are in the envelope, and every header costs the
            # consumers a parse per message.
            messages.append(Outgoing(self.subject(event.topic), payload, {"Nats-Msg-Id": event.id}))
        try:
            await self._publisher.publish(nc, messages, self._timeout_s)
        except NoStream:
            self._stream_ready = False  # the server lost it: create it again before the retry
            raise

    async def tail(self, topic: str, *, from_beginning: bool, limit: int | None) -> AsyncIterator[Event]:
        """Events of `topic` through an ephemeral ordered consumer (no durable state, nothing acked)."""
        js = await self._jetstream()
        policy = api.DeliverPolicy.ALL if from_beginning else api.DeliverPolicy.NEW
        sub = await js.subscribe(
            self.subject(topic), stream=self._stream, ordered_consumer=True, deliver_policy=policy
        )
        try:
            seen = 0
            async for msg in sub.messages:
                try:
                    event = decode_event(topic, msg.data)
                except EnvelopeInvalid as exc:
                    log.warning("tail %s: a message is not an event (%s)", topic, exc)
                    continue
                yield event
                seen += 1
                if limit is not None and seen >= limit:
                    return
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def close(self) -> None:
        """Stop the pull loops (a batch under way finishes and is acked) and drain the connection."""
        self._stopping.set()
        if self._loops:
            _, late = await asyncio.wait(self._loops, timeout=self._timeout_s * 3)
            for task in late:
                task.cancel()
            await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops.clear()
        if self._nc is not None:
            nc, self._nc, self._js = self._nc, None, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.drain(), timeout=self._timeout_s)
            with contextlib.suppress(Exception):
                await nc.close()

    # --- connection and stream

    async def _jetstream(self) -> JetStreamContext:
        async with self._connect_lock:
            if self._nc is None or self._nc.is_closed:
                try:
                    self._nc = await nats.connect(
                        self._url,
                        name=f"soma-{self._prefix}",
                        connect_timeout=max(1, int(self._timeout_s)),
                        allow_reconnect=True,
                        max_reconnect_attempts=-1,  # forever: outages end, the bus must outlive them
                        reconnect_time_wait=0.5,
                        error_cb=_log_error,
                        disconnected_cb=self._disconnected,
                        reconnected_cb=self._reconnected,
                    )
                except (TimeoutError, NatsError, OSError) as exc:
                    self._nc = None
                    raise BusUnavailable(f"NATS at {self._url} is not reachable: {exc!r}") from exc
                self._js = self._nc.jetstream(timeout=self._timeout_s)
                self._stream_ready = False
                await self._publisher.bind(self._nc)
            assert self._js is not None
            if not self._stream_ready:
                await self._ensure_stream(self._js)
                self._stream_ready = True
            return self._js

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        try:
            await js.stream_info(self._stream)
            return
        except NotFoundError:
            pass
        except (TimeoutError, NatsError) as exc:
            raise BusUnavailable(f"NATS at {self._url}: JetStream does not answer: {exc!r}") from exc
        try:
            await js.add_stream(
                api.StreamConfig(
                    name=self._stream,
                    subjects=[f"{self._prefix}.>"],
                    storage=api.StorageType.FILE,
                    retention=api.RetentionPolicy.LIMITS,
                    duplicate_window=120.0,
                )
            )
        except (TimeoutError, NatsError) as exc:
            raise BusUnavailable(f"NATS at {self._url} refused the stream {self._stream}: {exc!r}") from exc
        log.info("created JetStream stream %s for %s.>", self._stream, self._prefix)

    async def _disconnected(self) -> None:
        log.warning("NATS connection to %s lost; reconnecting", self._url)

    async def _reconnected(self) -> None:
        log.info("NATS connection to %s restored", self._url)

    # --- consumer loops

    async def _consume(self, spec: ConsumerSpec, topic: str) -> None:
        """One (group, topic) loop: bind the durable consumer, then batch → runner → ack until closed."""
        backoff = 0.0
        durable = durable_name(spec.group, topic)
        while not self._stopping.is_set():
            try:
                js = await self._jetstream()
                inbox = _Inbox()
                # A push consumer with a deliver group: the server streams messages (at most
                # `_MAX_ACK_PENDING` unacked) and splits them between the group's replicas. A pull
                # `fetch` costs a timer and a task per message in nats-py, four times the CPU of a push.
                sub = await js.subscribe(
                    self.subject(topic),
                    queue=durable,
                    durable=durable,
                    stream=self._stream,
                    cb=inbox.put,
                    manual_ack=True,
                    config=api.ConsumerConfig(
                        ack_policy=api.AckPolicy.EXPLICIT,
                        deliver_policy=api.DeliverPolicy.ALL,
                        max_deliver=-1,
                        ack_wait=_ACK_WAIT_S,
                        max_ack_pending=_MAX_ACK_PENDING,
                        filter_subject=self.subject(topic),
                    ),
                )
                backoff = 0.0
                try:
                    await self._consume_batches(spec, topic, js, durable, inbox)
                finally:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()  # the durable consumer stays, with what it acked
                    # What was pushed but not recorded goes back now, not after `_ACK_WAIT_S`.
                    await _settle(inbox.take_all(), ack=False)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._stream_ready = False
                backoff = min(_BACKOFF_MAX_S, max(_BACKOFF_FIRST_S, backoff * 2))
                log.warning(
                    "NATS consumer %s/%s stopped (%r); rebinding in %.1f s", spec.group, topic, exc, backoff
                )
                await self._pause(backoff)

    async def _consume_batches(
        self, spec: ConsumerSpec, topic: str, js: JetStreamContext, durable: str, inbox: _Inbox
    ) -> None:
        backoff = 0.0
        while not self._stopping.is_set():
            if not await inbox.wait(_IDLE_CHECK_S):
                # Idle: make sure the server still has the consumer (a server that lost its state, a
                # stream deleted by hand); NotFoundError ends this binding and `_consume` makes a new one.
                await js.consumer_info(self._stream, durable)
                continue
            if len(inbox) < _BATCH_MAX:
                await self._pause(_LINGER_S)  # let the batch fill: the runner's cost is per transaction
            msgs = inbox.take(_BATCH_MAX)
            try:
                await self._runner.handle_payloads(spec, topic, [m.data for m in msgs])
            except Exception as exc:
                backoff = min(_BACKOFF_MAX_S, max(_BACKOFF_FIRST_S, backoff * 2))
                log.warning(
                    "group %s could not record %d events of %s (%r); redelivering in %.1f s",
                    spec.group,
                    len(msgs),
                    topic,
                    exc,
                    backoff,
                )
                # Wait, then give back this batch and everything pushed after it, so the server
                # redelivers them in stream order (each tenant's events stay in order).
                await self._pause(backoff)
                await _settle(msgs + inbox.take_all(), ack=False)
                continue
            backoff = 0.0
            await _settle(msgs, ack=True)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)


class _Inbox:
    """The messages pushed to one (group, topic) consumer that its loop has not taken yet."""

    def __init__(self) -> None:
        self._msgs: list[Msg] = []
        self._arrived = asyncio.Event()

    def __len__(self) -> int:
        return len(self._msgs)

    async def put(self, msg: Msg) -> None:
        """The subscription's callback."""
        self._msgs.append(msg)
        self._arrived.set()

    async def wait(self, timeout_s: float) -> bool:
        """Whether a message is waiting (or arrives within `timeout_s`)."""
        if self._msgs:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._arrived.wait(), timeout=timeout_s)
        return bool(self._msgs)

    def take(self, limit: int) -> list[Msg]:
        """The oldest `limit` messages, removed."""
        taken, self._msgs = self._msgs[:limit], self._msgs[limit:]
        if not self._msgs:
            self._arrived.clear()
        return taken

    def take_all(self) -> list[Msg]:
        """Every waiting message, removed."""
        return self.take(len(self._msgs))


async def _settle(msgs: Sequence[Msg], *, ack: bool) -> None:
    """Ack (or nak) `msgs`; a lost ack only means a redelivery the runner will skip."""
    try:
        for msg in msgs:
            if ack:
                await msg.ack()
            else:
                await msg.nak()
    except NatsError as exc:
        log.warning(
            "could not %s %d messages (%r); they will be redelivered", "ack" if ack else "nak", len(msgs), exc
        )


async def _log_error(exc: Exception) -> None:
    log.warning("NATS client error: %r", exc)
