"""The seek Faust makes after dropping fetched records, against a real broker and consumer group.

Faust drops records fetched during a rebalance and calls ``seek_to_committed`` to read them
again. These tests pin why that loses records of a partition the group never committed (aiokafka
seeks only to a committed offset above 0) and that ``seek_to_committed_or_beginning`` reads them
again, while committed partitions and skipped topics behave as before.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import OffsetAndMetadata

from worker.consumer import seek_to_committed_or_beginning

pytestmark = pytest.mark.e2e

RECORDS_PER_PARTITION = 10


async def create_topic(bootstrap: str, name: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()


@pytest.fixture
async def fetched(kafka_bootstrap: str, unique_name: str) -> AsyncIterator[AIOKafkaConsumer]:
    """A group member of a 2-partition topic that fetched every record and committed nothing.

    Ten records on each partition; both positions are at 10, the group has no offset.
    """
    topic = f"seek-{unique_name}"
    await create_topic(kafka_bootstrap, topic, 2)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for partition in range(2):
            for i in range(RECORDS_PER_PARTITION):
                await producer.send_and_wait(topic, f"{i}".encode(), partition=partition)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=f"group-{unique_name}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        await read_to_end(consumer)
        yield consumer
    finally:
        await consumer.stop()


async def read_to_end(consumer: AIOKafkaConsumer) -> None:
    """Fetch (and drop) records until every partition's position is at its end."""
    deadline = time.monotonic() + 60
    while not consumer.assignment() or await positions(consumer) != [RECORDS_PER_PARTITION] * 2:
        assert time.monotonic() < deadline, "the records were not fetched within 60 s"
        await consumer.getmany(timeout_ms=500)


def partitions_of(consumer: AIOKafkaConsumer) -> list[TopicPartition]:
    return sorted(consumer.assignment())


async def positions(consumer: AIOKafkaConsumer) -> list[int]:
    return [await consumer.position(tp) for tp in partitions_of(consumer)]


async def test_aiokafka_seek_to_committed_leaves_an_uncommitted_partition_past_its_records(
    fetched: AIOKafkaConsumer,
) -> None:
    """The mechanism of the loss: Faust's seek moves nothing when there is no commit."""
    await fetched.seek_to_committed()
    assert await positions(fetched) == [RECORDS_PER_PARTITION, RECORDS_PER_PARTITION]


async def test_uncommitted_partitions_are_read_again_from_their_beginning(
    fetched: AIOKafkaConsumer,
) -> None:
    committed = await seek_to_committed_or_beginning(fetched)
    assert set(committed.values()) == {None}
    assert await positions(fetched) == [0, 0]
    again = await fetched.getmany(timeout_ms=5000)
    assert sorted(len(records) for records in again.values()) == [
        RECORDS_PER_PARTITION,
        RECORDS_PER_PARTITION,
    ]


async def test_committed_partitions_and_skipped_topics_keep_aiokafkas_seek(
    fetched: AIOKafkaConsumer,
) -> None:
    first, second = partitions_of(fetched)
    await fetched.commit({first: OffsetAndMetadata(4, "")})
    await seek_to_committed_or_beginning(fetched)
    assert await positions(fetched) == [4, 0]

    await read_to_end(fetched)
    await seek_to_committed_or_beginning(fetched, skip_topics={second.topic})
    # The skipped topic's uncommitted partition stays where the fetch left it.
    assert await positions(fetched) == [4, RECORDS_PER_PARTITION]
