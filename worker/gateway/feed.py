"""One shared consumer per partition, and the short-lived read of a resume.

A conversation's records are in the partition its key maps to (``partition_for``) in the delta
topic and in the response topic. ``PartitionFeed`` reads that pair of partitions with one
consumer (no group) from the moment it starts, folds every record with one ``StreamFolder``
(``vapi_stream_client.folding``: duplicates dropped, restarts marked) and hands each event to
the subscriptions of the record's conversation. All browsers following conversations on a
partition share its feed; ``Feeds`` starts a partition's feed with its first subscription and
keeps it until the gateway stops (at most one per partition).

A delta topic's records are read before the response topic's, and before a response is folded
every delta published until then is read (the client library's rule), so a reply's text comes
before its end.

A subscription holds at most ``queue_size`` events: a browser that reads slower than that is
cut off, and its ``EventSource`` reconnects and resumes from its last id.

``catch_up`` serves a resume: a consumer of its own, for that one request, reads the
conversation's partitions from the browser's cursor up to the feed's position at the moment of
subscribing (from then on the feed delivers), folds with a new ``StreamFolder`` first fed the
records of the ``lookback_s`` before the cursor (so a redelivered delta from before the cursor is
still recognised), and merges the two topics by record timestamp. A cursor more than
``max_records`` records behind, or below what retention kept, is refused (``CursorError``).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, TypeAlias

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from pydantic import ValidationError

from vapi_stream_client import ChatClient, Event, StreamFolder, partition_for
from vapi_stream_client.messages import ChatDelta, ChatResponse
from worker.gateway.cursor import Cursor, CursorError, SseEvent, TopicKind, record_events

log = structlog.get_logger("worker.gateway.feed")

#: How long one poll of a feed waits for records.
POLL_MS = 200
Record: TypeAlias = ConsumerRecord[bytes, bytes]


class Subscription:
    """One browser's events of one conversation; ``None`` in the queue ends it."""

    def __init__(self, conversation_id: str, queue_size: int) -> None:
        self.conversation_id = conversation_id
        self.queue: asyncio.Queue[SseEvent | None] = asyncio.Queue(queue_size + 1)
        self.cut_off = False
        self._limit = queue_size

    def put(self, events: list[SseEvent]) -> None:
        if self.cut_off:
            return
        for event in events:
            if self.queue.qsize() >= self._limit:
                self.cut_off = True
                self.queue.put_nowait(None)
                return
            self.queue.put_nowait(event)


def fold(folder: StreamFolder, kind: TopicKind, record: Record) -> list[Event]:
    """The folded events of one record; an unreadable record makes none (it is logged)."""
    try:
        if kind == "d":
            return folder.on_delta(ChatDelta.model_validate_json(record.value or b""))
        return folder.on_response(ChatResponse.model_validate_json(record.value or b""))
    except ValidationError as exc:
        log.warning(
            "gateway_unreadable_record",
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            error=str(exc.errors(include_url=False, include_input=False)[0]["msg"]),
        )
        return []


class PartitionFeed:
    """The shared consumer of one delta partition and one response partition."""

    def __init__(
        self,
        client: ChatClient,
        deltas: TopicPartition,
        responses: TopicPartition,
        *,
        queue_size: int,
    ) -> None:
        self.client = client
        self.deltas = deltas
        self.responses = responses
        self.queue_size = queue_size
        self.folder = StreamFolder()
        self.subscriptions: defaultdict[str, set[Subscription]] = defaultdict(set)
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._cursor = Cursor(deltas.partition, 0, responses.partition, 0)
        self.records_read = 0

    @property
    def cursor(self) -> Cursor:
        """Everything below this was folded and handed to the subscriptions of the moment."""
        return self._cursor

    async def start(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.client.bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            **self.client.kafka_options,
        )
        await consumer.start()
        try:
            consumer.assign([self.deltas, self.responses])
            await consumer.seek_to_end(self.deltas, self.responses)
            self._cursor = Cursor(
                self.deltas.partition,
                await consumer.position(self.deltas),
                self.responses.partition,
                await consumer.position(self.responses),
            )
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer
        self._task = asyncio.create_task(self._run(), name=f"gateway-feed-{self.deltas}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()
        for subscriptions in self.subscriptions.values():
            for subscription in subscriptions:
                subscription.queue.put_nowait(None)

    def subscribe(self, conversation_id: str) -> tuple[Subscription, Cursor]:
        """A subscription to the conversation's events from now on, and the cursor it starts
        at (what a resume reads up to)."""
        subscription = Subscription(conversation_id, self.queue_size)
        self.subscriptions[conversation_id].add(subscription)
        return subscription, self._cursor

    def unsubscribe(self, subscription: Subscription) -> None:
        subscriptions = self.subscriptions.get(subscription.conversation_id)
        if subscriptions is not None:
            subscriptions.discard(subscription)
            if not subscriptions:
                del self.subscriptions[subscription.conversation_id]

    async def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while True:
            try:
                batch = await consumer.getmany(timeout_ms=POLL_MS)
                for record in batch.get(self.deltas, []):
                    self._deliver("d", record)
                for record in batch.get(self.responses, []):
                    await self._catch_up_deltas(consumer)
                    self._deliver("r", record)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the feed outlives a broker's hiccup; aiokafka reconnects
                log.warning("gateway_feed_error", partition=str(self.deltas), error=repr(exc))
                # Records fetched and not yet handed out are read again, none skipped.
                consumer.seek(self.deltas, self._cursor.deltas)
                consumer.seek(self.responses, self._cursor.responses)
                await asyncio.sleep(1)

    async def _catch_up_deltas(self, consumer: AIOKafkaConsumer) -> None:
        end = (await consumer.end_offsets([self.deltas]))[self.deltas]
        while self._cursor.deltas < end:
            batch = await consumer.getmany(self.deltas, timeout_ms=POLL_MS)
            for record in batch.get(self.deltas, []):
                self._deliver("d", record)

    def _deliver(self, kind: TopicKind, record: Record) -> None:
        self.records_read += 1
        events = fold(self.folder, kind, record)
        after = self._cursor.advanced(kind, record.offset)
        self._cursor = after
        if not events:
            return
        subscriptions = self.subscriptions.get(events[0].conversation_id)
        if subscriptions:
            sse = record_events(events, after, kind)
            for subscription in subscriptions:
                subscription.put(sse)


class Feeds:
    """The gateway's feeds, one per partition pair, started by their first subscription."""

    def __init__(self, client: ChatClient, *, queue_size: int) -> None:
        self.client = client
        self.queue_size = queue_size
        self._feeds: dict[tuple[int, int], PartitionFeed] = {}
        self._starting: dict[tuple[int, int], asyncio.Lock] = defaultdict(asyncio.Lock)
        self._counts: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._feeds)

    async def feed_for(self, conversation_id: str) -> PartitionFeed:
        topics = self.client.topics
        deltas = partition_for(conversation_id, await self._count(topics.deltas))
        responses = partition_for(conversation_id, await self._count(topics.responses))
        key = (deltas, responses)
        async with self._starting[key]:
            feed = self._feeds.get(key)
            if feed is None:
                feed = PartitionFeed(
                    self.client,
                    TopicPartition(topics.deltas, deltas),
                    TopicPartition(topics.responses, responses),
                    queue_size=self.queue_size,
                )
                await feed.start()
                self._feeds[key] = feed
        return feed

    async def _count(self, topic: str) -> int:
        """A topic's partition count, asked once (the worker never changes it)."""
        count = self._counts.get(topic)
        if count is None:
            count = self._counts[topic] = await self.client.partitions(topic)
        return count

    async def stop(self) -> None:
        feeds, self._feeds = list(self._feeds.values()), {}
        for feed in feeds:
            await feed.stop()


async def catch_up(
    feed: PartitionFeed,
    conversation_id: str,
    since: Cursor,
    until: Cursor,
    *,
    lookback_s: float,
    max_records: int,
) -> list[SseEvent]:
    """The conversation's events between ``since`` (a browser's last id) and ``until`` (the
    feed's cursor when it subscribed), read by a consumer of its own (module docstring)."""
    if (since.delta_partition, since.response_partition) != (
        until.delta_partition,
        until.response_partition,
    ):
        raise CursorError("the event id is of other partitions than this conversation's")
    first_d, first_r, skip = since.first_unsent()
    if first_d > until.deltas or first_r > until.responses:
        raise CursorError("the event id is ahead of what this gateway has read")
    if (until.deltas - first_d) + (until.responses - first_r) > max_records:
        raise CursorError(f"the event id is more than {max_records} records behind")
    if (first_d, first_r) == (until.deltas, until.responses) and skip == 0:
        return []
    client = feed.client
    consumer = AIOKafkaConsumer(
        bootstrap_servers=client.bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        **client.kafka_options,
    )
    await consumer.start()
    try:
        tps = {"d": feed.deltas, "r": feed.responses}
        firsts = {"d": first_d, "r": first_r}
        ends = {"d": until.deltas, "r": until.responses}
        consumer.assign(list(tps.values()))
        starts = await _warm_starts(consumer, tps, firsts, lookback_s, max_records)
        records = {
            kind: await _read_range(consumer, tps[kind], starts[kind], ends[kind])
            for kind in ("d", "r")
        }
    finally:
        await consumer.stop()
    return _fold_range(conversation_id, records, since, firsts, skip)


async def _warm_starts(
    consumer: AIOKafkaConsumer,
    tps: dict[str, TopicPartition],
    firsts: dict[str, int],
    lookback_s: float,
    max_records: int,
) -> dict[str, int]:
    beginnings = await consumer.beginning_offsets(list(tps.values()))
    since_ms = int((time.time() - lookback_s) * 1000)
    found = await consumer.offsets_for_times(dict.fromkeys(tps.values(), since_ms))
    starts: dict[str, int] = {}
    for kind, tp in tps.items():
        if firsts[kind] < beginnings[tp]:
            raise CursorError("the event id points below what the topics still keep")
        at = found.get(tp)
        warm = firsts[kind] if at is None else min(at.offset, firsts[kind])
        starts[kind] = max(warm, beginnings[tp], firsts[kind] - max_records)
    return starts


async def _read_range(
    consumer: AIOKafkaConsumer, tp: TopicPartition, start: int, end: int
) -> list[Record]:
    out: list[Record] = []
    if start >= end:
        return out
    consumer.seek(tp, start)
    while await consumer.position(tp) < end:
        batch = await consumer.getmany(tp, timeout_ms=POLL_MS)
        out += [record for record in batch.get(tp, []) if record.offset < end]
    return out


def _fold_range(
    conversation_id: str,
    records: dict[str, list[Record]],
    since: Cursor,
    firsts: dict[str, int],
    skip: int,
) -> list[SseEvent]:
    """Fold the records (only the conversation's; timestamps merge the topics, each topic
    keeps its order, deltas first on a tie) and keep the events at and after ``firsts``."""
    key = conversation_id.encode()
    folder = StreamFolder()
    merged: Iterable[tuple[Any, ...]] = heapq.merge(
        ((r.timestamp, 0, r.offset, "d", r) for r in records["d"]),
        ((r.timestamp, 1, r.offset, "r", r) for r in records["r"]),
        key=lambda item: (item[0], item[1]),
    )
    cursor = Cursor(since.delta_partition, firsts["d"], since.response_partition, firsts["r"])
    out: list[SseEvent] = []
    for _, _, offset, kind, record in merged:
        sending = offset >= firsts[kind]
        if sending:
            cursor = cursor.advanced(kind, offset)
        if record.key != key:
            continue
        events = fold(folder, kind, record)
        if sending and events:
            first = offset == firsts[kind] and (kind, offset) == _partial_record(since)
            out += record_events(events, cursor, kind, skip if first else 0)
    return out


def _partial_record(since: Cursor) -> tuple[str, int] | None:
    if since.partial is None:
        return None
    kind = since.partial[0]
    return (kind, since.deltas - 1) if kind == "d" else (kind, since.responses - 1)
