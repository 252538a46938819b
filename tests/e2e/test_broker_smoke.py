"""The test broker itself: a record goes in and comes out again."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from tests.kafka_fixture import create_topics

pytestmark = pytest.mark.e2e


async def test_record_round_trips_through_the_broker(
    kafka_bootstrap: str, unique_name: str
) -> None:
    """A record produced to a new topic comes back to a consumer group with key and value intact."""
    topic = f"smoke.{unique_name}"
    await create_topics(kafka_bootstrap, [topic], partitions=2)

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        sent = await producer.send_and_wait(topic, b"h\xc3\xa9llo", key=b"conversation-1")
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=f"smoke.{unique_name}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), timeout=60)
    finally:
        await consumer.stop()

    assert (record.key, record.value) == (b"conversation-1", b"h\xc3\xa9llo")
    assert (record.partition, record.offset) == (sent.partition, sent.offset)
