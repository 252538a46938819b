"""The client distribution (``vapi_stream_client``) against the real broker, simulator and worker:
ask, following one conversation among others, redelivered streams, and careless input."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from tests.e2e.harness import SimulatorProcess, WorkerProcess, produce
from tests.e2e.harness import Topics as E2ETopics
from tests.kafka_fixture import create_topics
from vapi_stream_client import (
    AskTimeoutError,
    ChatClient,
    ClientError,
    Delta,
    FollowEvent,
    InvalidRequestError,
    Response,
    Restart,
    TopicMissingError,
    Topics,
    Unreadable,
    partition_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

PARTITIONS = 4


@pytest.fixture
def simulator() -> Iterator[SimulatorProcess]:
    sim = SimulatorProcess(
        "--first-token-latency-s", "0.05", "--inter-token-delay-s", "0.01"
    ).start()
    yield sim
    sim.stop()


def _client_topics(topics: E2ETopics) -> Topics:
    return Topics(requests=topics.requests, deltas=topics.deltas, responses=topics.responses)


def _delta(
    request_id: str, conversation: str, seq: int, text: str, *, attempt: int = 1, chat: str
) -> tuple[bytes, bytes]:
    body = {
        "request_id": request_id,
        "conversation_id": conversation,
        "chat_id": chat,
        "attempt": attempt,
        "seq": seq,
        "delta": text,
        "ts": 1.0,
    }
    return conversation.encode(), json.dumps(body).encode()


def _response(
    request_id: str, conversation: str, text: str, *, chat: str, deltas: int
) -> tuple[bytes, bytes]:
    body = {
        "request_id": request_id,
        "conversation_id": conversation,
        "chat_id": chat,
        "previous_chat_id": None,
        "status": "completed",
        "text": text,
        "delta_count": deltas,
        "attempts": 2,
        "context_reset": False,
        "error": None,
        "timings": {"queued_ms": 1, "first_delta_ms": 2, "total_ms": 3},
        "metadata": None,
    }
    return conversation.encode(), json.dumps(body).encode()


def _keys_on(partition: int, count: int, prefix: str) -> list[str]:
    """``count`` conversation ids that Kafka's default partitioner puts on ``partition``."""
    found = []
    n = 0
    while len(found) < count:
        key = f"{prefix}-{n}"
        if partition_for(key, PARTITIONS) == partition:
            found.append(key)
        n += 1
    return found


async def _events_until(follower: Any, done: Any, timeout_s: float = 30.0) -> list[FollowEvent]:
    events: list[FollowEvent] = []
    async with asyncio.timeout(timeout_s):
        while not done(events):
            events += await follower.poll()
    return events


async def test_ask_through_the_worker_returns_the_final_with_its_deltas(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: E2ETopics, tmp_path: Path
) -> None:
    """Two conversations ask at once through one worker: each ask gets only its own deltas,
    they concatenate to its final response's text, and the next turn remembers the first."""
    worker = WorkerProcess(kafka_bootstrap, topics, simulator, tmp_path).start()
    try:
        worker.wait_ready()
        seen: dict[str, list[FollowEvent]] = {"conv-a": [], "conv-b": []}
        async with ChatClient(kafka_bootstrap, topics=_client_topics(topics)) as client:
            first = await asyncio.gather(
                *(
                    client.ask(conv, f"My name is {name}.", on_event=seen[conv].append)
                    for conv, name in (("conv-a", "Alice"), ("conv-b", "Bob"))
                )
            )
            for response, conv in zip(first, seen, strict=True):
                assert response.status == "completed", response
                assert response.conversation_id == conv
                events = seen[conv]
                assert {e.conversation_id for e in events} == {conv}
                deltas = [e for e in events if isinstance(e, Delta)]
                assert "".join(d.text for d in deltas) == response.text
                assert len(deltas) == response.delta_count > 0
                assert isinstance(events[-1], Response)
                assert not any(isinstance(e, Restart) for e in events)
            second = await client.ask("conv-a", "What's my name?", timeout_s=60)
            assert second.status == "completed"
            assert "Alice" in second.text
            assert second.previous_chat_id == first[0].chat_id
    finally:
        assert worker.terminate() == 0, worker.log_tail()


async def test_following_one_conversation_reads_its_partition_only(
    kafka_bootstrap: str, topics: E2ETopics
) -> None:
    """The partition a follower computes for a conversation is the one Kafka's producer put its
    records on; it yields only that conversation's events while another conversation streams on
    the same partition and a third on another one."""
    await create_topics(
        kafka_bootstrap, [topics.requests, topics.deltas, topics.responses], PARTITIONS
    )
    keys = [f"key-{n}" for n in range(40)]
    placed = await produce(kafka_bootstrap, topics.requests, [(k.encode(), b"{}") for k in keys])
    assert [m.partition for m in placed] == [partition_for(k, PARTITIONS) for k in keys]

    mine, neighbour = _keys_on(1, 2, "same")
    (elsewhere,) = _keys_on(3, 1, "other")
    async with (
        ChatClient(kafka_bootstrap, topics=_client_topics(topics)) as client,
        client.follow(conversation_id=mine) as follower,
    ):
        assert follower._consumer is not None
        assert follower._consumer.assignment() == {
            TopicPartition(topics.deltas, 1),
            TopicPartition(topics.responses, 1),
        }
        records = []
        for seq, word in enumerate(["one ", "two ", "three"]):
            for conv in (mine, neighbour, elsewhere):
                records.append(_delta(f"r-{conv}", conv, seq, word, chat=f"chat-{conv}"))
        await produce(kafka_bootstrap, topics.deltas, records)
        await produce(
            kafka_bootstrap,
            topics.responses,
            [
                _response(f"r-{c}", c, "one two three", chat=f"chat-{c}", deltas=3)
                for c in (neighbour, elsewhere, mine)
            ],
        )
        events = await _events_until(
            follower, lambda got: any(isinstance(e, Response) for e in got)
        )
    assert {e.conversation_id for e in events} == {mine}
    assert "".join(e.text for e in events if isinstance(e, Delta)) == "one two three"


async def test_a_redelivered_attempt_yields_one_restart_and_no_duplicated_text(
    kafka_bootstrap: str, topics: E2ETopics
) -> None:
    """Records as a crash and a retry leave them: attempt 1 cut off and redelivered in part,
    attempt 2 with copies of its deltas, a late delta of attempt 1. The follower shows one
    Restart and attempt 2's text once, then the response, which names attempt 2's chat."""
    await create_topics(kafka_bootstrap, [topics.deltas, topics.responses], PARTITIONS)
    conv, request = "conv-r", "req-r"

    def d(seq: int, text: str, attempt: int) -> tuple[bytes, bytes]:
        return _delta(request, conv, seq, text, attempt=attempt, chat=f"chat-{attempt}")

    await produce(
        kafka_bootstrap,
        topics.deltas,
        [
            d(0, "Hel", 1),
            d(1, "lo?", 1),
            d(0, "Hel", 1),  # redelivered
            d(0, "Good", 2),
            d(1, " day", 2),
            d(1, " day", 2),  # redelivered
            d(2, "lo?!", 1),  # the cut-off attempt's straggler: void
            d(2, "!", 2),
        ],
    )
    await produce(
        kafka_bootstrap,
        topics.responses,
        [_response(request, conv, "Good day!", chat="chat-2", deltas=3)],
    )
    async with (
        ChatClient(kafka_bootstrap, topics=_client_topics(topics)) as client,
        client.follow(request_id=request, start="beginning") as follower,
    ):
        events = await _events_until(
            follower, lambda got: any(isinstance(e, Response) for e in got)
        )
    assert [type(e).__name__ for e in events] == [
        "Delta", "Delta", "Restart", "Delta", "Delta", "Delta", "Response",
    ]  # fmt: skip
    restart = events[2]
    assert isinstance(restart, Restart)
    assert (restart.attempt, restart.chat_id, restart.reason) == (2, "chat-2", "new_stream")
    assert "".join(e.text for e in events[3:] if isinstance(e, Delta)) == "Good day!"


async def test_careless_input_gives_clear_errors_and_produces_nothing(
    kafka_bootstrap: str, topics: E2ETopics
) -> None:
    """No key, wrong types, a foreign header, a missing topic, a client used before it starts, a
    garbage record on the delta topic, an ask nobody answers: each is a ClientError that says
    what is wrong (or an Unreadable event), and no request record is produced."""
    with pytest.raises(ValueError, match="bootstrap_servers"):
        ChatClient("")
    client = ChatClient(kafka_bootstrap, topics=_client_topics(topics), topic_wait_s=1.0)
    with pytest.raises(ClientError, match="not started"):
        await client.partitions(topics.requests)
    async with client:
        with pytest.raises(TopicMissingError, match=repr(topics.requests)):
            await client.send("c1", "hi")
        await create_topics(
            kafka_bootstrap, [topics.requests, topics.deltas, topics.responses], PARTITIONS
        )
        careless: list[tuple[Any, Any, dict[str, Any], str]] = [
            (None, "hi", {}, "conversation_id"),
            ("", "hi", {}, "conversation_id"),
            (42, "hi", {}, "conversation_id"),
            ("c1", 42, {}, "input"),
            ("c1", [], {}, "input"),
            ("c1", [{"role": "robot", "content": "x"}], {}, "input"),
            ("c1", "hi", {"reset_context": "yes"}, "reset_context"),
            ("c1", "hi", {"headers": [("traceparent", "not-bytes")]}, "traceparent"),
            ("c1", "hi", {"headers": [("schema", b"chat.request.v2")]}, "schema"),
        ]
        for conversation, text, options, named in careless:
            with pytest.raises(InvalidRequestError, match=named):
                await client.send(conversation, text, **options)
        with pytest.raises(InvalidRequestError, match="ChatRequest"):
            await client.send_request({"request_id": "r", "conversation_id": "c"})  # type: ignore[arg-type]
        for conversation, request_id in [("", None), ("c1", ""), ("c1", "r" * 201)]:
            with pytest.raises(InvalidRequestError, match=r"chat\.cancel\.v1"):
                await client.cancel(conversation, request_id)
        assert await _record_count(kafka_bootstrap, topics.requests) == 0

        async with client.follow() as follower:
            await produce(kafka_bootstrap, topics.deltas, [(b"c1", b"not json"), (b"c1", b"{}")])
            events = await _events_until(follower, lambda got: len(got) >= 2)
        assert all(isinstance(e, Unreadable) for e in events)
        assert {e.topic for e in events if isinstance(e, Unreadable)} == {topics.deltas}

        with pytest.raises(AskTimeoutError, match="no final response") as timed_out:
            await client.ask("c1", "anyone?", request_id="lonely", timeout_s=1.0)
        assert timed_out.value.request_id == "lonely"
    assert await _record_count(kafka_bootstrap, topics.requests) == 1  # the ask's request


async def test_send_never_creates_the_request_topic(
    kafka_bootstrap: str, topics: E2ETopics
) -> None:
    """A send to a topic that does not exist fails, and the topic still does not exist."""
    async with ChatClient(
        kafka_bootstrap, topics=_client_topics(topics), topic_wait_s=0.5
    ) as client:
        with pytest.raises(TopicMissingError):
            await client.send("c1", "hi")
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        assert topics.requests not in await admin.list_topics()
    finally:
        await admin.close()


async def _record_count(bootstrap: str, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        ends = await consumer.end_offsets(partitions)
        return sum(ends.values())
    finally:
        await consumer.stop()
