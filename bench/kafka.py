"""Kafka for the bench: topics, the request load, the output reader, and the raw ceiling.

The reader is a plain aiokafka consumer (no group) on the output topics from offset 0; it stamps
each fetched batch with ``time.time()`` and keeps the raw delta bytes, parsing them only after
the run so that its own CPU use stays small while the worker is measured on the same two cores.
It does not fold while it reads: ``bench.check`` needs the raw records (a repeated or reordered
delta is a failure there, which folding would hide), and after the run folds them with the
client's ``StreamFolder``, as a consuming service would. The topics' partitions come from the
client (``ChatClient.partitions``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from vapi_stream_client import ChatClient

#: How long the broker may hold the reader's fetch while there is no new record.
READ_WAIT_MS = 20
#: The headers the worker puts on a delta (``worker.messages.output_headers``), for the ceiling.
DELTA_HEADERS = [("content-type", b"application/json"), ("schema", b"chat.delta.v1")]


@dataclass(frozen=True)
class Topics:
    """One run's topic names and Faust app id (unique per run, so runs never mix)."""

    requests: str
    deltas: str
    responses: str
    dlq: str
    app_id: str

    @classmethod
    def unique(cls, tag: str) -> Topics:
        return cls(
            requests=f"bench-{tag}-requests",
            deltas=f"bench-{tag}-deltas",
            responses=f"bench-{tag}-responses",
            dlq=f"bench-{tag}-dlq",
            app_id=f"bench-{tag}",
        )

    def env(self) -> dict[str, str]:
        """The worker's environment variables for these names."""
        return {
            "TOPIC_REQUESTS": self.requests,
            "TOPIC_DELTAS": self.deltas,
            "TOPIC_RESPONSES": self.responses,
            "TOPIC_DLQ": self.dlq,
            "WORKER_APP_ID": self.app_id,
        }


async def create_topics(bootstrap: str, names: Iterable[str], partitions: int) -> None:
    """Create the topics with ``partitions`` partitions each."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1) for name in names]
        )
    finally:
        await admin.close()


async def produce(bootstrap: str, topic: str, records: Iterable[tuple[bytes, bytes]]) -> None:
    """Produce ``(key, value)`` records in order and wait until all are acknowledged."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key) for key, value in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


@dataclass
class Outputs:
    """What the reader saw: raw deltas with their read times, parsed responses, DLQ count."""

    deltas: list[tuple[float, bytes]] = field(default_factory=list)
    responses: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    dead_letters: int = 0


class OutputReader:
    """Reads a run's output topics in the background until told to stop."""

    def __init__(self, bootstrap: str, topics: Topics) -> None:
        self._bootstrap = bootstrap
        self._topics = topics
        self.outputs = Outputs()
        self._response_ids: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> OutputReader:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # The broker answers a fetch as soon as there is a record (fetch_min_bytes=1): read
            # times are not held back; READ_WAIT_MS only bounds an idle fetch.
            fetch_max_wait_ms=READ_WAIT_MS,
            fetch_min_bytes=1,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        self._consumer = consumer
        await consumer.start()
        topics = self._topics
        partitions: list[TopicPartition] = []
        async with ChatClient(self._bootstrap) as client:
            for topic in (topics.deltas, topics.responses, topics.dlq):
                partitions += [
                    TopicPartition(topic, p) for p in range(await client.partitions(topic))
                ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        for tp in partitions:
            await consumer.position(tp)
        self._task = asyncio.create_task(self._run(consumer))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()

    async def _run(self, consumer: AIOKafkaConsumer) -> None:
        deltas_topic, responses_topic = self._topics.deltas, self._topics.responses
        outputs = self.outputs
        while True:
            batch = await consumer.getmany(timeout_ms=100)
            now = time.time()
            for tp, records in batch.items():
                if tp.topic == deltas_topic:
                    outputs.deltas.extend((now, record.value) for record in records)
                elif tp.topic == responses_topic:
                    for record in records:
                        response = json.loads(record.value)
                        outputs.responses.append((now, response))
                        self._response_ids.add(response["request_id"])
                else:
                    outputs.dead_letters += len(records)

    def responded(self) -> int:
        """How many distinct requests have a response so far."""
        return len(self._response_ids)

    def failed(self) -> BaseException | None:
        """The reader task's exception, if it died."""
        if self._task is not None and self._task.done() and not self._task.cancelled():
            return self._task.exception()
        return None


async def raw_ceiling(
    bootstrap: str, topic: str, keys: Sequence[bytes], value: bytes
) -> tuple[float, float]:
    """Send one record per key with a bare aiokafka producer; returns (seconds, records/s).

    The producer is configured as the worker's (acks=all, idempotence, 2 ms linger) and sends
    as fast as it can, keeping every future and waiting for all acks at the end.
    """
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=2
    )
    await producer.start()
    try:
        # One record first, so that metadata and the connection are not part of the timing.
        await (await producer.send(topic, value, key=keys[0], headers=DELTA_HEADERS))
        started = time.perf_counter()
        futures = [
            await producer.send(topic, value, key=key, headers=DELTA_HEADERS) for key in keys
        ]
        await asyncio.gather(*futures)
        seconds = time.perf_counter() - started
    finally:
        await producer.stop()
    return seconds, len(keys) / seconds
