"""Every Faust and aiokafka adapter of the worker, and every private interface of theirs it uses.

faust-streaming is pinned (0.15.3) and aiokafka held below 0.15: each private name used here
carries ruff's SLF001 exemption with its reason where it is an attribute of another object, is
listed in docs/design.md §10.4 with the overrides, and is checked by
``tests/unit/test_private_apis.py``, which fails when an upgrade removes or changes one. Outside
this module nothing in the worker uses a private part of Faust or aiokafka.

* :class:`IdempotentProducer`: Faust's producer with idempotence on (§10.2).
* :class:`KafkaPublisher`: the worker's outputs (deltas, final responses, dead letters) through
  Faust's producer, and what it still holds at a release: :func:`flush_within`,
  :func:`drop_held_records` (§9).
* :class:`RewindingConsumer`: Faust's consumer whose seek never leaves a partition past records
  not taken (``worker.consumer``, §5.6).
* :class:`SteadyFlowControl` and :class:`FaustApp`: the app's flow control and its hooks: the
  release before Faust's drain, garbage-collector tuning, closing the Vapi client (§10.2).
* :func:`recovery_progress`: what the table recovery still has to read, for
  ``worker.recovery_watch``.
* :class:`StateTable` and :class:`TableStore`: the ``chat-state`` table, whose writes reach the
  changelog at once, and the memory store that holds only the partitions this worker owns
  (§10.3). The conversation state itself, and ``ConversationStore`` over the table, are in
  ``worker.state``.

What the producer holds at a release
------------------------------------
An idempotent aiokafka producer never expires a batch: it retries a retriable error (a deleted or
leaderless partition, too few in-sync replicas, a broker that does not answer) until the broker
takes the record. Faust flushes the producer after a release and before every commit, so one such
record would hold a shutdown or a rebalance forever, and once the partition had moved on, the
record could still land: a final response from a worker that no longer owns the request, or a
``chat-state`` write restored over the next owner's newer one. So the worker waits for its
producer for a bounded time (:func:`flush_within`) and, past that, drops what it holds
(:func:`drop_held_records`): its sender stops, its connections close and every held record fails,
so none of them can be sent any more. The producer is of no further use; the process stops and
restarts with a new one. A produce request already on the wire when the sender stops cannot be
recalled: the broker appends it or not when it reads it, in practice at once.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import aiokafka
import faust
import structlog
from aiokafka.conn import CloseReason
from aiokafka.errors import IllegalStateError, KafkaError
from aiokafka.structs import TopicPartition
from faust.exceptions import NotReady
from faust.stores.memory import Store
from faust.transport.consumer import RecordMap
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
from faust.transport.drivers.aiokafka import Producer as AIOKafkaProducer
from faust.types import TP, EventT
from faust.types.stores import StoreT
from mode.utils.objects import cached_property
from mode.utils.queues import FlowControlEvent

from worker.config import Settings
from worker.consumer import seek_to_committed_or_beginning
from worker.dispatcher import PRODUCER_CLOSED, Dispatcher
from worker.errors import InvalidRequestError, ProducerClosedError
from worker.limits import fit_dead_letter
from worker.messages import ChatDelta, ChatResponse, Headers, dead_letter_headers
from worker.state import with_last_active

log = structlog.get_logger(__name__)


class IdempotentProducer(AIOKafkaProducer):
    """Faust's producer with idempotence on.

    Faust enables it only under ``exactly_once``, which would hold every delta back until the
    transaction commits. Idempotence alone keeps a partition's records in order and free of
    producer-retry duplicates, which is what the delta stream needs.
    """

    def _settings_extra(self) -> dict[str, Any]:
        return {"acks": "all", "enable_idempotence": True}


def _transactional(producer: Any) -> bool:
    # aiokafka's ``send`` refuses records outside a transaction on a transactional producer;
    # the direct path must not skip that check (this worker's producer is idempotent only).
    txn = producer._txn_manager  # noqa: SLF001  aiokafka has no public "is transactional"
    return txn is not None and txn.transactional_id is not None


class KafkaPublisher:
    """Publishes the worker's outputs through Faust's producer (one producer per process)."""

    #: Conversations whose delta partition is remembered; the map is dropped when it is full.
    MAX_REMEMBERED_PARTITIONS = 65_536

    def __init__(
        self, app: faust.App, settings: Settings, *, also_written: Sequence[str] = ()
    ) -> None:
        self._app = app
        #: The producer's ``max_request_size``: no record larger than this may be sent.
        self.max_record_bytes: int = app.conf.producer_max_request_size
        self._deltas = settings.topic_deltas
        self._responses = settings.topic_responses
        self._dlq = settings.topic_dlq
        self._delta_partitions: dict[bytes, TopicPartition] = {}
        #: Every topic this process writes to: the outputs, and ``also_written`` (the changelog).
        self.written_topics = (self._deltas, self._responses, self._dlq, *also_written)
        self._tracking = False

    def _track_written_topics(self, producer: Any) -> None:
        """Have the producer keep every written topic in its metadata, from the first write on.

        aiokafka fetches the metadata of all topics until it is asked for one it does not know
        (a send to it); from then on it refreshes only the topics asked for so. A topic known
        from an all-topics fetch was never asked for: it drops out of the metadata at the next
        refresh, and a batch for it that was still waiting then is never sent: its partition
        stalls (seen with the changelog created late at start-up). Tracked from the start, no
        written topic can drop out.
        """
        if not self._tracking:
            for topic in self.written_topics:
                producer.client.add_topic(topic)
            self._tracking = True

    async def send_delta(self, delta: ChatDelta, headers: Headers) -> Awaitable[object]:
        key = delta.conversation_id.encode()
        producer = self._aiokafka_producer()
        # The producer would hash the key again for every delta (pure-Python murmur2 and two
        # copies of the partition list): the partition of a conversation is looked up once.
        tp = self._delta_partitions.get(key)
        if tp is not None and not _transactional(producer):
            # A known partition goes straight into the producer's batch for it: what ``send``
            # does last, without its per-record metadata wait, partition check (a new set of the
            # topic's partitions each time), key/value serializer calls and debug log: ~7 us a
            # delta, 8% of the worker's CPU flat out. Same batches, sequence numbers and acks.
            # The skipped size check holds anyway: the handler splits text that would not fit
            # (``worker.limits.MAX_DELTA_TEXT_BYTES``), so a delta record is never near a limit.
            return cast(
                Awaitable[object],
                await producer._message_accumulator.add_message(  # noqa: SLF001  into the batch: docs/design.md §10.4
                    tp,
                    key,
                    delta.encode(),
                    producer._request_timeout_ms / 1000,  # noqa: SLF001  send's own timeout
                    headers=headers,
                ),
            )
        # Only reached before the fast path above: its batches need the topic tracked.
        self._track_written_topics(producer)
        # Straight to the aiokafka producer under Faust's (the same instance and settings):
        # Faust's send adds, per record, a check of the headers against ``typing.Mapping`` and an
        # ``on_produce_message`` signal nobody here listens to: a few us per delta, for nothing.
        fut: Awaitable[object] = await producer.send(
            self._deltas,
            delta.encode(),
            key=key,
            partition=None if tp is None else tp.partition,
            headers=headers,
        )
        if tp is None:
            # After a send, so the topic's metadata is known; same partitioner, same answer.
            if len(self._delta_partitions) >= self.MAX_REMEMBERED_PARTITIONS:
                self._delta_partitions.clear()
            partition = self._app.producer.key_partition(self._deltas, key).partition
            self._delta_partitions[key] = TopicPartition(self._deltas, partition)
        return fut

    def _aiokafka_producer(self) -> Any:
        # ``_ensure_producer`` is Faust's own accessor (faust-streaming is pinned); it raises
        # NotReady before the producer has started.
        return cast(Any, self._app.producer)._ensure_producer()  # noqa: SLF001  no public getter

    async def send_response(self, response: ChatResponse, headers: Headers) -> None:
        self._track_written_topics(self._aiokafka_producer())
        fut = await self._app.producer.send(
            self._responses,
            response.conversation_id.encode(),
            response.encode(),
            None,
            None,
            list(headers),
        )
        # Faust flushes before committing but never surfaces a failed send: await this one.
        await fut

    async def flush_within(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the broker's answer to every record the producer holds."""
        try:
            producer = self._aiokafka_producer()
        except NotReady:
            return True  # a producer that never started holds nothing
        return await flush_within(producer, timeout_s)

    async def drop_held_records(self, reason: str) -> dict[str, int]:
        """Drop what the producer holds, so none of it is ever sent; returns the count by topic."""
        return await drop_held_records(self._aiokafka_producer(), reason)

    async def send_dead_letter(self, event: Any, error: InvalidRequestError) -> None:
        self._track_written_topics(self._aiokafka_producer())
        message = event.message
        headers = dead_letter_headers(
            list(message.headers or ()),
            reason=error.reason,
            detail=error.detail or "",
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
        )
        # A record may be larger than this producer may send (the request topic's limit is the
        # broker's, not ours): it is dead-lettered cut to fit, with a header saying so.
        key, value, fitted = fit_dead_letter(
            message.key, message.value, headers, max_bytes=self.max_record_bytes
        )
        if len(fitted) != len(headers):
            log.warning(
                "dead letter cut to fit a record",
                original_bytes=len(message.value or b""),
                limit=self.max_record_bytes,
            )
        fut = await self._app.producer.send(self._dlq, key, value, None, None, cast(Any, fitted))
        await fut


#: How long a stopped sender gets to wind down its requests in flight (they fail at once: their
#: connections are closed first).
SENDER_STOP_S = 1.0


async def flush_within(producer: Any, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` until the broker acked (or refused) every record ``producer`` holds.

    Returns False when records were still held at the deadline.
    """
    flush = asyncio.ensure_future(producer.flush())
    done, _ = await asyncio.wait([flush], timeout=max(timeout_s, 0.0))
    if not done:
        flush.cancel()  # only a wait on the batches: cancelling it leaves them as they are
        return False
    return True


async def drop_held_records(producer: Any, reason: str) -> dict[str, int]:
    """Stop ``producer`` sending and fail every record it holds; returns their count per topic.

    Afterwards nothing of what it held can reach the broker. A later send on it fails with a
    ``KafkaError`` carrying ``reason`` (after waiting, up to the request timeout, for its topic's
    metadata if the producer has none): the producer is of no further use.
    """
    accumulator = producer._message_accumulator  # noqa: SLF001  the held batches
    sender_task = producer._sender.sender_task  # noqa: SLF001  the task that sends them
    if sender_task is not None:
        sender_task.cancel()  # no more batches drained, no more retries
    for conn in list(producer.client._conns.values()):  # noqa: SLF001  its connections
        conn.close(reason=CloseReason.SHUTDOWN)  # requests in flight fail now, not at their timeout
    if sender_task is not None:
        # Its requests in flight end first (each puts its batch back for a retry that never comes).
        await asyncio.wait([sender_task], timeout=SENDER_STOP_S)
    batches = accumulator._batches.values()  # noqa: SLF001  batches not sent yet
    queued = [batch for per_partition in batches for batch in per_partition]
    held = queued + list(accumulator._pending_batches)  # noqa: SLF001  batches in flight
    # A batch that went out and came back for a retry has a callback that takes it out of the
    # in-flight set once it is done: it must be in that set when it fails.
    retried = (batch for batch in queued if batch.retry_count > 0)
    accumulator._pending_batches.update(retried)  # noqa: SLF001  as a sent batch is
    for batch in held:
        for future, _ in batch._msg_futures:  # noqa: SLF001  each record's future
            future.add_done_callback(_retrieve)  # nobody may be left to await it
    accumulator.fail_all(KafkaError(reason))
    dropped: dict[str, int] = {}
    for batch in held:
        dropped[batch.tp.topic] = dropped.get(batch.tp.topic, 0) + batch.record_count
    return dropped


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class RewindingConsumerThread(AIOKafkaConsumerThread):
    """The consumer thread whose ``seek_to_committed`` also rewinds uncommitted partitions, and
    whose fetch takes from aiokafka only what Faust will hand over.

    Faust fetches with its live set of active partitions, which it changes while the fetch waits
    in this thread (up to a second), and aiokafka reads an empty set as *every* partition. A
    fetch under way when Faust paused everything (a rebalance, the end of a changelog read)
    drained every partition's buffered records, advanced their positions, and Faust dropped the
    records of partitions not active. A request partition then started past records nobody took
    (requests lost); a changelog partition of a recovery that had just been sought to its start
    never got its records, and the recovery waited for them forever. So the fetch asks for a copy
    of the set taken when it starts (none when it is empty), and records it takes while Faust
    stopped the flow or moved to another generation are given back: their partitions are sought
    back to them.
    """

    async def getmany(  # Faust's signature
        self,
        active_partitions: set[TP] | None,
        timeout: float,  # noqa: ASYNC109
    ) -> RecordMap:
        if active_partitions is None:  # a client-only app: every partition, as Faust means it
            return await super().getmany(active_partitions, timeout)
        asked = frozenset(active_partitions)
        if not asked:
            return {}
        records: RecordMap = await self.call_thread(
            self._fetch_asked,
            self._ensure_consumer(),
            asked,
            self.consumer.app.consumer_generation_id,
            timeout,
        )
        return records

    async def _fetch_asked(
        self,
        consumer: aiokafka.AIOKafkaConsumer,
        asked: frozenset[TP],
        generation: int,
        wait_s: float,
    ) -> RecordMap:
        """In the consumer thread: Faust's fetch of ``asked``, given back unless Faust takes it."""
        records: RecordMap = await self._fetch_records(
            consumer,
            cast(set[TP], asked),
            timeout=wait_s,
            max_records=consumer._max_poll_records,  # noqa: SLF001  # as Faust's own getmany
        )
        if records and (
            not self.consumer.flow_active or self.consumer.app.consumer_generation_id != generation
        ):
            give_back(consumer, records)
            return {}
        return records

    async def seek_to_committed(self) -> Mapping[TP, int]:
        # Typed ``int`` by Faust; aiokafka's values are None where nothing is committed.
        changelogs = set(self.app.tables.changelog_topics)
        result: Mapping[TP, int] = await self.call_thread(
            seek_to_committed_or_beginning, self._ensure_consumer(), changelogs
        )
        return result


def give_back(consumer: aiokafka.AIOKafkaConsumer, records: RecordMap) -> None:
    """Seek each partition of ``records`` back to its first record, so it is fetched again."""
    for tp, taken in records.items():
        if not taken:
            continue
        try:
            consumer.seek(tp, taken[0].offset)
        except IllegalStateError:
            continue  # no longer assigned: its next owner reads it from the committed offset
    log.info(
        "fetched records given back: the flow stopped or the generation changed",
        partitions={
            f"{tp.topic}[{tp.partition}]": taken[0].offset for tp, taken in records.items() if taken
        },
    )


class RewindingConsumer(AIOKafkaConsumer):
    """Faust's aiokafka consumer running :class:`RewindingConsumerThread`, which resumes a
    request partition only once it has been sought to its committed offset.

    At the end of a table recovery Faust resumes the stream partitions and only then seeks them
    to their committed offsets, with its fetcher running. Records fetched in between are handed
    over from wherever the fetch position was, and any of them may be dropped on the way (a
    batch cut short, a callback cancelled); after the seek the same offsets come again. A
    record handed over in that first pass, above one that was dropped, ran out of order and made
    the dropped one look like a copy of a record already taken: a request lost. Here a stream
    partition Faust resumes stays paused until the seek that follows, so every record a stream
    sees comes from the committed offset on, in order.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Stream partitions Faust resumed, held paused until the next ``perform_seek``.
        self._held_for_seek: set[TP] = set()

    def _new_consumer_thread(self) -> RewindingConsumerThread:
        return RewindingConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def resume_partitions(self, tps: Iterable[TP]) -> None:
        tps = set(tps)
        held = {tp for tp in tps if not self._is_changelog_tp(tp)}
        self._held_for_seek |= held
        super().resume_partitions(tps - held)

    async def perform_seek(self) -> None:
        try:
            await super().perform_seek()
        finally:
            # Also when the seek failed: a partition left paused would never be read again.
            held, self._held_for_seek = self._held_for_seek & self.assignment(), set()
            if held:
                super().resume_partitions(held)

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        self._held_for_seek -= revoked
        await super().on_partitions_revoked(revoked)


class SteadyFlowControl(FlowControlEvent):
    """Faust's flow control, except that resuming a flow that is not suspended clears nothing.

    ``resume()`` empties every stream queue. At the end of table recovery Faust resumes the
    stream partitions, seeks them to the committed offset with the fetcher already running (flow
    control was resumed for the changelog reads), and only then calls ``resume()`` again: records
    queued in that window were emptied out and, being past the seek, never fetched again. Once
    later records were acked the commit passed them: requests lost. Emptying is for records
    queued before a suspension; with nothing suspended, nothing in the queues is stale.
    """

    def resume(self) -> None:
        if self.is_active():
            return
        super().resume()


#: Second-generation collections between full ones (CPython's default is 10).
FULL_COLLECTION_THRESHOLD = 100


class FaustApp(faust.App):
    """faust.App with two hooks: release the dispatcher's records before Faust drains them, and
    keep records queued after a recovery (:class:`SteadyFlowControl`).

    Faust calls ``_consumer_wait_empty`` on shutdown and on every partition revocation, after it
    has stopped fetching and before it waits for unacked records and commits. It is a private
    method of the pinned faust-streaming version; the e2e shutdown and rebalance tests cover it.
    """

    dispatcher: Dispatcher | None = None
    shutdown_grace_s: float = 25.0
    rebalance_grace_s: float = 3.0
    #: Closes the Vapi client's connections once Faust has stopped (set by ``worker.app.assemble``).
    close_vapi_client: Callable[[], Awaitable[None]] | None = None

    async def on_started(self) -> None:
        await super().on_started()
        # Everything built to start the worker (Faust, aiokafka, pydantic schemas: ~100k objects)
        # lives as long as the process. Left in the collector's oldest generation, every full
        # collection walked all of it: pauses of up to 200 ms on this 2-core machine, which
        # stalled every stream at once and were most of the delta p99. Frozen, they are skipped.
        gc.collect()
        gc.freeze()
        # Full collections still took 25-50 ms over what a running worker holds (taken records,
        # streams, producer batches), one or two per 10 s of load (measured with gc.callbacks);
        # ten times rarer, they drop out of a run. Young collections keep their default pace.
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, FULL_COLLECTION_THRESHOLD)

    async def on_stop(self) -> None:
        await super().on_stop()
        if self.close_vapi_client is not None:
            await self.close_vapi_client()

    @cached_property
    def flow_control(self) -> FlowControlEvent:
        return SteadyFlowControl(loop=self.loop)

    async def _consumer_wait_empty(self, consumer: Any, logger: Any) -> None:
        delivered = True
        stopping = bool(self.should_stop)
        if self.dispatcher is not None:
            grace = self.shutdown_grace_s if stopping else self.rebalance_grace_s
            delivered = await self.dispatcher.release(grace)
        await super()._consumer_wait_empty(consumer, logger)
        if not delivered and not stopping:
            # A rebalance: Faust crashes the app on this, and the process exits for a restart.
            raise ProducerClosedError(PRODUCER_CLOSED)


@dataclass(frozen=True)
class RecoveryProgress:
    """One look at Faust's table recovery (``app.tables.recovery``)."""

    #: True from the start of a recovery until Faust ends it (its request partitions paused).
    in_recovery: bool
    #: Each active changelog partition (``topic[partition]``) and the offsets still to read.
    remaining: Mapping[str, int]
    #: When the recovery under way started (monotonic), or None: a new value is a new recovery.
    started_at: float | None


def recovery_progress(app: faust.App) -> RecoveryProgress:
    """Read the recovery's state from the app; safe before Faust starts.

    ``active_remaining()`` is, per active changelog partition, the last offset at the start of
    the recovery (Faust's highwater - 1, read once per recovery) minus the last offset read
    (its earliest - 1 to begin with), so it falls by one with every record read, and a
    partition whose offsets are not known yet is not in it.
    """
    recovery = cast(Any, app.tables).recovery
    return RecoveryProgress(
        in_recovery=bool(recovery.in_recovery),
        remaining={
            f"{tp.topic}[{tp.partition}]": int(n) for tp, n in recovery.active_remaining().items()
        },
        started_at=recovery._recovery_started_at,  # noqa: SLF001  no public start time of a recovery
    )


class StateTable(faust.Table[str, Any]):
    """A Faust table with writes and deletes that go to the changelog at once, acknowledged.

    ``table[key] = value`` only queues the changelog record in Faust's producer buffer, which one
    task drains record by record; under load that lags the write by a second or more. A worker
    killed in that lag loses the "request finished" records of requests whose responses are
    already out, and answers them twice after restart. ``write_through`` sends the record itself,
    straight to the producer, and returns once the broker has it: the window shrinks to that one
    round trip, right after the response's.

    ``delete_soon`` removes a key and queues its tombstone. A key's records reach its changelog
    partition in the order they were queued: a write that comes while the key's tombstone is
    being queued waits for it, so a deleted conversation that comes back is not deleted again
    by the tombstone on the next recovery.

    Values live in a :class:`TableStore`, which knows every key's partition
    and drops the keys of partitions this worker lost.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        #: Keys whose tombstone is being queued, with the event set once it is.
        self._deleting: dict[str, asyncio.Event] = {}

    def _new_store(self) -> StoreT[str, Any]:  # Faust's private store factory, overridden
        return TableStore(
            self._store or self.app.conf.store,
            self.app,
            self,
            table_name=self.name,
            key_type=self.key_type,
            key_serializer=self.key_serializer,
            value_serializer=self.value_serializer,
            value_type=self.value_type,
            loop=self.loop,
            options=self.options,
        )

    @property
    def store(self) -> TableStore:
        """The table's storage."""
        return cast("TableStore", self.data)

    async def write_through(self, key: str, value: Any, partition: int) -> None:
        """Set ``key`` locally and wait until its changelog record is on ``partition``."""
        deleting = self._deleting.get(key)
        if deleting is not None:
            await deleting.wait()  # the key's tombstone goes first
        # The local copy, without queueing a second changelog record.
        self.store.put(key, value, partition)
        sent = await self.changelog_topic.send(
            key=key,
            value=value,
            partition=partition,
            key_serializer=self.key_serializer,
            value_serializer=self.value_serializer,
            callback=self._on_changelog_sent,  # as Faust's own writes (persisted offsets)
            force=True,  # never held back as an attachment until commit
        )
        await sent

    async def delete_soon(self, key: str, partition: int) -> Awaitable[object]:
        """Delete ``key`` locally now and queue its tombstone on ``partition``.

        Returns once the tombstone is queued; the result resolves when the broker has it.
        """
        self.store.remove(key)
        queued = self._deleting[key] = asyncio.Event()
        try:
            return cast(
                Awaitable[object],
                await self.changelog_topic.send(
                    key=key,
                    value=None,
                    partition=partition,
                    key_serializer=self.key_serializer,
                    value_serializer="raw",  # None stays None: a tombstone
                    callback=self._on_changelog_sent,
                    force=True,
                ),
            )
        finally:
            del self._deleting[key]
            queued.set()


class TableStore(Store[Any, Any]):
    """Faust's memory store, holding only what this worker owns.

    Faust's memory store is a dict. It records a key's partition only when recovery reads the
    key from the changelog, so keys written while the worker ran (every value the worker writes)
    had none: when their partition went to another worker they stayed in memory for good, and
    came back from the dict, stale, if the partition ever returned. This store records the
    partition of every key, drops a partition's keys as soon as it is revoked, and (as Faust's
    store does) drops at the end of every recovery the keys of partitions that are not this
    worker's active ones.

    It also knows, per partition it owns, the offset of the newest changelog record it holds
    (read in a recovery or written and acknowledged since): Faust's recovery of a partition that
    stays with this worker across a rebalance reads on from there. Faust's memory store said
    "nothing held", so every rebalance read again everything the worker had written since it
    started.

    Recovery applies changelog records in offset order: a value replaces the key's, a tombstone
    (value None) deletes it. A value written before conversations had a ``last_active_ms`` gets
    the time of its changelog record (``worker.state.with_last_active``).
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        #: Changelog partitions this worker owns, as of the last rebalance.
        self._owned: set[int] = set()
        #: Per owned partition, the offset of the newest changelog record held here.
        self._offsets: dict[int, int] = {}

    def persisted_offset(self, tp: TP) -> int | None:
        """The offset of the newest record of ``tp`` held here; None: none held."""
        return self._offsets.get(tp.partition)

    def set_persisted_offset(self, tp: TP, offset: int) -> None:
        """Note an acknowledged write (Faust calls this); ignored for a partition not owned."""
        self._hold(tp.partition, offset)

    def _hold(self, partition: int, offset: int) -> None:
        if partition in self._owned and offset > self._offsets.get(partition, -1):
            self._offsets[partition] = offset

    def put(self, key: Any, value: Any, partition: int) -> None:
        """Set ``key`` to ``value``, a key of changelog ``partition``."""
        self.data[key] = value
        self._key_partition[key] = partition

    def remove(self, key: Any) -> None:
        """Forget ``key`` (nothing happens when it is not here)."""
        self.data.pop(key, None)
        self._key_partition.pop(key, None)

    def partition_of(self, key: Any) -> int | None:
        """The changelog partition of ``key``; None for a key this store does not hold."""
        return self._key_partition.get(key)

    def drop_partitions(self, partitions: Iterable[int]) -> int:
        """Forget every key of ``partitions``; returns how many went."""
        gone = set(partitions)
        if not gone:
            return 0
        for partition in gone:
            self._offsets.pop(partition, None)
        keys = [key for key, partition in self._key_partition.items() if partition in gone]
        for key in keys:
            self.remove(key)
        return len(keys)

    def apply_changelog_batch(
        self,
        batch: Iterable[EventT[Any]],
        to_key: Callable[[Any], Any],
        to_value: Callable[[Any], Any],
    ) -> None:
        """Apply changelog records in order: a value sets its key, a tombstone deletes it."""
        for event in batch:
            key = to_key(event.key)
            message = event.message
            self._hold(message.partition, message.offset)
            if message.value is None:
                self.remove(key)
                continue
            value = with_last_active(to_value(event.value), _record_ms(message))
            self.put(key, value, message.partition)

    async def on_rebalance(
        self,
        assigned: set[TP],
        revoked: set[TP],
        newly_assigned: set[TP],
        generation_id: int = 0,
    ) -> None:
        """Drop the keys of changelog partitions this worker lost."""
        await super().on_rebalance(assigned, revoked, newly_assigned, generation_id)
        changelog = self.table.changelog_topic.get_topic_name()
        self._owned = {tp.partition for tp in assigned if tp.topic == changelog}
        self.drop_partitions(tp.partition for tp in revoked if tp.topic == changelog)

    async def on_recovery_completed(self, active_tps: set[TP], standby_tps: set[TP]) -> None:
        """Drop everything of partitions that are not this worker's active ones."""
        await super().on_recovery_completed(active_tps, standby_tps)
        active = {tp.partition for tp in active_tps}
        self.drop_partitions(set(self._offsets) - active)


def _record_ms(message: Any) -> int:
    """The changelog record's time in ms; now for a record without one."""
    timestamp = message.timestamp
    if isinstance(timestamp, int | float) and timestamp > 0:
        return round(timestamp * 1000)
    return round(time.time() * 1000)
