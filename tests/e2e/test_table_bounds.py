"""The chat-state table stays bounded: idle conversations expire, lost partitions leave memory.

- A conversation idle for ``WORKER_CONVERSATION_TTL_S`` is deleted with a tombstone on its
  changelog partition (a compacted topic); a restarted worker does not recover it, and its next
  turn starts a fresh Vapi chat.
- A conversation with a turn taken and waiting is not deleted under it, however long it was idle.
- After a rebalance each worker holds only the conversations of partitions it owns: neither the
  ones it wrote before losing their partition nor standby copies of the others'; and a partition
  it kept is not read again from the changelog.

The table's size is read from ``chat_worker_conversations`` on each worker's ``/metrics``.
"""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from tests.e2e.harness import (
    OutputReader,
    SimulatorProcess,
    Topics,
    WorkerProcess,
    Workers,
    calls_by_request,
    paced,
    parse_metrics,
    produce,
    read_topic,
    request_record,
    wait_committed_past,
    wait_until,
)

pytestmark = pytest.mark.e2e

#: A row of the tables Faust logs at a recovery: topic (or a ditto mark), partition, offset.
TABLE_ROW = re.compile(r"^\|\s*\S+\s*\|\s*(\d+)\s*\|\s*(-?\d+)\s*\|$", re.MULTILINE)


def conversations(worker: WorkerProcess) -> float:
    """How many conversations the worker's table holds."""
    return parse_metrics(worker.metrics()).get("chat_worker_conversations", -1.0)


def expired(worker: WorkerProcess) -> float:
    return parse_metrics(worker.metrics()).get("chat_worker_conversations_expired_total", -1.0)


async def topic_config(bootstrap: str, topic: str, name: str) -> str | None:
    """One configuration value of ``topic``, as the broker reports it."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        await admin.close()
    for response in described:
        for resource in response.resources:
            for entry in resource[4]:
                if entry[0] == name:
                    return str(entry[1])
    return None


def last_recovery(worker: WorkerProcess) -> tuple[dict[int, int], dict[int, int]]:
    """The worker's last complete table recovery, from Faust's log: per changelog partition,
    its highwater (last offset) and the offset reading started at (-1: its beginning). Faust
    logs the highwater table first; a recovery counts once its start table follows it."""
    highwaters: dict[int, int] = {}
    last: tuple[dict[int, int], dict[int, int]] = ({}, {})
    for record in worker.log_records():
        event = str(record.get("event", ""))
        rows = {int(match[1]): int(match[2]) for match in TABLE_ROW.finditer(event)}
        if "Highwater - Active" in event:
            highwaters = rows
        elif "Reading Starts At - Active" in event:
            last = (highwaters, rows)
    return last


async def test_idle_conversations_are_deleted_by_tombstone_and_not_recovered(
    kafka_bootstrap: str, topics: Topics, simulator: SimulatorProcess, workers: Workers
) -> None:
    """Two conversations go idle past a 3 s TTL: both are deleted, locally and with a tombstone
    on the (compacted) changelog. A worker started afterwards, with a TTL that would keep them,
    recovers neither: the next turn of one of them reaches Vapi without a previousChatId, and
    the turn after it continues from that new chat."""
    first = await workers.start_ready("first", WORKER_CONVERSATION_TTL_S="3")
    async with OutputReader(kafka_bootstrap, topics) as reader:
        await produce(
            kafka_bootstrap,
            topics.requests,
            [request_record("keep", "keep-1", "hi"), request_record("idle", "idle-1", "hi")],
        )
        await reader.wait_for_responses(["keep-1", "idle-1"])
        await wait_until(
            lambda: expired(first) == 2 and conversations(first) == 0,
            60,
            "both conversations to expire",
            poll_s=0.5,
        )

        changelog = await read_topic(kafka_bootstrap, topics.changelog())
        last = {json.loads(record.key): record.value for record in changelog}
        assert last == {"keep": None, "idle": None}, "the newest record of each is a tombstone"
        assert await topic_config(kafka_bootstrap, topics.changelog(), "cleanup.policy") == (
            "compact"
        )

        assert first.terminate() == 0
        second = await workers.start_ready("second", WORKER_CONVERSATION_TTL_S="3600")
        assert conversations(second) == 0, "recovery applied the tombstones"

        for request_id in ("keep-2", "keep-3"):
            await produce(
                kafka_bootstrap, topics.requests, [request_record("keep", request_id, "hi")]
            )
            await reader.wait_for_responses([request_id])
        answers = reader.outputs.responses_by_request()

    calls = calls_by_request(simulator)
    assert calls["keep-2"][0]["previous_chat_id"] is None, "a fresh Vapi chat after expiry"
    assert calls["keep-3"][0]["previous_chat_id"] == answers["keep-2"][0]["chat_id"]
    assert conversations(second) == 1


async def test_a_conversation_with_a_turn_waiting_is_not_expired_under_it(
    kafka_bootstrap: str, topics: Topics, simulator: SimulatorProcess, workers: Workers
) -> None:
    """One request partition, one stream at a time, TTL 5 s. X's first turn finishes; then a
    slow turn of Y (about 15 s) takes the only slot and X's second turn waits behind it in the
    scheduler, past the TTL. X is not deleted meanwhile: its second turn continues its chat."""
    await workers.start_ready(
        "w", TOPIC_PARTITIONS="1", WORKER_MAX_IN_FLIGHT="1", WORKER_CONVERSATION_TTL_S="5"
    )
    async with OutputReader(kafka_bootstrap, topics) as reader:
        await produce(kafka_bootstrap, topics.requests, [request_record("x", "x-1", "hi")])
        await reader.wait_for_responses(["x-1"])
        await produce(
            kafka_bootstrap,
            topics.requests,
            [
                request_record("y", "y-1", paced("slow", tokens=60, delay_ms=250)),
                request_record("x", "x-2", "again"),
            ],
        )
        await reader.wait_for_responses(["y-1", "x-2"], timeout_s=90)
        answers = reader.outputs.responses_by_request()

    calls = calls_by_request(simulator)
    x1_ended = max(call["ended_at"] for call in calls["x-1"])
    assert calls["x-2"][0]["started_at"] - x1_ended > 5, "x-2 waited past the TTL"
    assert calls["x-2"][0]["previous_chat_id"] == answers["x-1"][0]["chat_id"]
    assert answers["x-2"][0]["status"] == "completed"


async def test_each_worker_holds_only_the_conversations_of_its_own_partitions(
    kafka_bootstrap: str, topics: Topics, simulator: SimulatorProcess, workers: Workers
) -> None:
    """Twelve conversations over four partitions, all handled by worker A. B joins: the two
    split the partitions, and their tables together hold the twelve once (A used to keep all
    it had written), and A does not read the partitions it kept again (it read them from
    their beginning). Then 1,200 new conversations on one partition: the worker that does not
    own it holds none of them (a standby replica read them into memory, applied in batches of
    Faust's buffer of 1,000 changelog records)."""
    ids = [f"conv-{n}" for n in range(12)]
    a = await workers.start_ready("a")
    async with OutputReader(kafka_bootstrap, topics) as reader:
        placed = await produce(
            kafka_bootstrap, topics.requests, [request_record(c, f"{c}-1", "hi") for c in ids]
        )
        assert {meta.partition for meta in placed} == {0, 1, 2, 3}
        await reader.wait_for_responses([f"{c}-1" for c in ids])
        await wait_until(lambda: conversations(a) == 12, 30, "A to hold all twelve")

        b = await workers.start_ready("b")
        held: dict[str, float] = {}

        def split(total: int) -> bool:
            held.update(a=conversations(a), b=conversations(b))
            return sum(held.values()) == total and min(held.values()) > 0

        try:
            await wait_until(lambda: split(12), 60, "A and B to split the twelve")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; held: {held}") from None
        # A kept two partitions it had written to: its recovery read on from its own newest
        # record (it read them again from the beginning before).
        await wait_until(
            lambda: max(last_recovery(a)[0].values(), default=-1) >= 0,
            30,
            "A's log to show its recovery after B joined",
        )
        highwaters, starts = last_recovery(a)
        assert starts == highwaters

        many = [f"many-{n}" for n in range(1_200)]
        fast = paced("hi", tokens=1, delay_ms=0, first_ms=0)
        ends = await _produce_to(
            kafka_bootstrap,
            topics.requests,
            0,
            [request_record(c, f"{c}-1", fast) for c in many],
        )
        await reader.wait_for_responses([f"{c}-1" for c in many], timeout_s=180)
        # Committed offsets pass a record only after its table write is acknowledged.
        await wait_committed_past(kafka_bootstrap, topics, {0: ends - 1})
        await asyncio.sleep(3)  # a standby copy is fetched within milliseconds of the write

    split(12 + 1_200)
    assert sum(held.values()) == 12 + 1_200, held
    assert min(held.values()) > 0, held


async def _produce_to(
    bootstrap: str, topic: str, partition: int, records: list[tuple[bytes, bytes]]
) -> int:
    """Produce ``records`` to one partition; returns the offset after the last one."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        sent = [
            await producer.send(topic, value, key=key, partition=partition)
            for key, value in records
        ]
        return int((await asyncio.gather(*sent))[-1].offset) + 1
    finally:
        await producer.stop()
