"""The NATS JetStream adapter of the bus port (nats-py): one file-backed stream for every topic, a durable
pull consumer per (group, topic) that acks only after the runner has recorded the batch.

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

from somaagent.events.bus import BusUnavailable
from somaagent.events.consumers import ConsumerSpec
from somaagent.events.runner import ConsumerRunner
from somaagent.events.schemas import Event
from somaagent.events.wire import EnvelopeInvalid, decode_event, encode_event

log = logging.getLogger(__name__)

_FETCH_MAX = 500
_FETCH_WAIT_S = 0.5
_BACKOFF_FIRST_S = 0.2
_BACKOFF_MAX_S = 5.0
# Longer than the slowest batch the runner records (retries included), so a batch under way is not
# redelivered to another replica while it is being applied.
_ACK_WAIT_S = 60.0
_MAX_ACK_PENDING = 20_000
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def stream_name(prefix: str) -> str:
    """The stream of a prefix: `soma` → `SOMA_EVENTS` (stream names may not contain `.`, `*`, `>`)."""
    return _NAME_UNSAFE.sub("_", prefix).upper() + "_EVENTS"


def durable_name(group: str, topic: str) -> str:
    """The durable consumer of (group, topic), readable and collision-free: `billing-model_usage-1a2b3c4d`."""
    digest = hashlib.sha256(f"{group}\x00{topic}".encode()).hexdigest()[:8]
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
            await asyncio.wait_for(self._publish_all(events), timeout=self._timeout_s)
        except (TimeoutError, NatsError, OSError) as exc:
            raise BusUnavailable(f"NATS at {self._url} did not store {len(events)} events: {exc!r}") from exc

    async def _publish_all(self, events: Sequence[Event]) -> None:
        js = await self._jetstream()
        acks: list[asyncio.Future[api.PubAck]] = []
        try:
            for event in events:
                headers = {
                    "Nats-Msg-Id": event.id,
                    "type": event.type,
                    "version": str(event.version),
                }
                # publish_async writes in call order on one connection: the stream stores them in order.
                acks.append(
                    await js.publish_async(
                        self.subject(event.topic), encode_event(event), headers=headers, stream=self._stream
                    )
                )
            await asyncio.gather(*acks)
        finally:
            for ack in acks:
                if not ack.done():
                    ack.cancel()

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
        """One (group, topic) loop: bind the durable consumer, then fetch → runner → ack until closed."""
        backoff = 0.0
        while not self._stopping.is_set():
            try:
                js = await self._jetstream()
                sub = await js.pull_subscribe(
                    self.subject(topic),
                    durable=durable_name(spec.group, topic),
                    stream=self._stream,
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
                    await self._consume_batches(spec, topic, sub)
                finally:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
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
        self, spec: ConsumerSpec, topic: str, sub: JetStreamContext.PullSubscription
    ) -> None:
        backoff = 0.0
        while not self._stopping.is_set():
            try:
                msgs = await sub.fetch(_FETCH_MAX, timeout=_FETCH_WAIT_S)
            except TimeoutError:
                continue
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
                # Wait first, then nak without delay, so the redelivery comes before newer messages.
                await self._pause(backoff)
                await _settle(msgs, ack=False)
                continue
            backoff = 0.0
            await _settle(msgs, ack=True)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)


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
