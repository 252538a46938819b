"""The held-records drop (worker.kafka_adapters) against a real broker: a record Kafka will not
take, waited for and dropped.

Two idempotent producers each hold one record for a topic that is gone (``UnwritableTopic``).
One keeps it, the other drops it; when the topic is back, the kept record lands and the dropped
one does not, though its producer is still running.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from tests.e2e.harness import UnwritableTopic, read_topic
from tests.kafka_fixture import create_topics
from worker.kafka_adapters import drop_held_records, flush_within

pytestmark = pytest.mark.e2e

#: As the worker's producer (Faust's 1200 s): no batch expires during the test.
REQUEST_TIMEOUT_MS = 600_000


async def holding_producer(bootstrap: str, topic: str) -> AIOKafkaProducer:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=True, request_timeout_ms=REQUEST_TIMEOUT_MS
    )
    await producer.start()
    await producer.partitions_for(topic)  # known: a send goes straight into a batch
    return producer


@pytest.mark.timeout(180)
async def test_a_dropped_record_never_lands_when_its_topic_comes_back(
    kafka_bootstrap: str, unique_name: str
) -> None:
    """The bounded flush reports the held record, the drop fails it, and it never lands."""
    topic = f"held_{unique_name}"
    await create_topics(kafka_bootstrap, [topic])
    kept = await holding_producer(kafka_bootstrap, topic)
    dropped = await holding_producer(kafka_bootstrap, topic)
    unwritable = UnwritableTopic(kafka_bootstrap, topic, partitions=1)
    try:
        await unwritable.break_it()
        kept_ack: asyncio.Future[Any] = await kept.send(topic, b"kept", key=b"k")
        dropped_ack: asyncio.Future[Any] = await dropped.send(topic, b"dropped", key=b"k")
        assert not await flush_within(dropped, 2.0)

        assert await drop_held_records(dropped, "dropped by the test") == {topic: 1}
        with pytest.raises(KafkaError, match="dropped by the test"):
            await dropped_ack
        assert await flush_within(dropped, 1.0)

        await unwritable.fix_it()
        await asyncio.wait_for(kept_ack, 60)
        values = [record.value for record in await read_topic(kafka_bootstrap, topic)]
        assert values == [b"kept"]
    finally:
        for producer in (kept, dropped):
            await asyncio.wait_for(producer.stop(), 10)
