"""The Kafka publisher against the real broker: no written topic drops out of the producer's view.

aiokafka fetches the metadata of every topic until a send names a topic it does not know (the
changelog, when it is created late at start-up); from then on it refreshes only the topics named
so. A topic known from the all-topics fetch but never named drops out of the metadata, and a batch
still waiting for it then is never sent: its partition stalls. The deltas' direct path (straight
into the producer's batches) never names its topic at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry

from tests.kafka_fixture import create_topics
from worker.app import assemble
from worker.config import Settings
from worker.errors import InvalidRequestError
from worker.messages import ChatDelta, ChatResponse, Timings
from worker.metrics import WorkerMetrics

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def _delta(seq: int) -> ChatDelta:
    return ChatDelta(
        request_id="r-1",
        conversation_id="c-1",
        chat_id="chat-1",
        attempt=1,
        seq=seq,
        delta="hi",
        ts=time.time(),
    )


def _response() -> ChatResponse:
    return ChatResponse(
        request_id="r-0",
        conversation_id="c-0",
        chat_id="chat-0",
        previous_chat_id=None,
        status="completed",
        text="hi",
        delta_count=1,
        attempts=1,
        context_reset=False,
        error=None,
        timings=Timings(queued_ms=0.0, first_delta_ms=1.0, total_ms=2.0),
        metadata=None,
    )


@dataclass
class _Message:
    topic: str
    key: bytes = b"c-0"
    value: bytes = b"not json"
    partition: int = 0
    offset: int = 0
    headers: list[tuple[str, bytes]] = field(default_factory=list)


@dataclass
class _Event:
    message: _Message


@pytest.mark.parametrize("first", ["delta", "response", "dead_letter"])
async def test_every_written_topic_stays_in_view_after_the_producer_learns_of_a_new_one(
    kafka_bootstrap: str, unique_name: str, first: str
) -> None:
    """Whatever the first write, every topic the worker writes is tracked from then on, and
    a delta on the direct path is still acknowledged after a send to a topic that came later."""
    settings = Settings(
        kafka_bootstrap_servers=kafka_bootstrap,
        topic_deltas=f"deltas-{unique_name}",
        topic_responses=f"responses-{unique_name}",
        topic_dlq=f"dlq-{unique_name}",
        worker_app_id=f"app-{unique_name}",
    )
    late = f"late-{unique_name}"
    await create_topics(
        kafka_bootstrap,
        [settings.topic_deltas, settings.topic_responses, settings.topic_dlq],
        partitions=2,
    )
    assembly = assemble(
        settings,
        WorkerMetrics(CollectorRegistry()),
        vapi_base_url="http://127.0.0.1:9",
        vapi_api_key="unused",
    )
    publisher, producer = assembly.publisher, assembly.app.producer
    await producer.start()
    try:
        if first == "response":
            await asyncio.wait_for(publisher.send_response(_response(), []), 30)
        elif first == "dead_letter":
            event = _Event(_Message(topic=f"requests-{unique_name}"))
            await asyncio.wait_for(
                publisher.send_dead_letter(event, InvalidRequestError("not_json")), 30
            )
        await asyncio.wait_for(await publisher.send_delta(_delta(0), []), 30)
        tracked = producer._ensure_producer().client._topics  # aiokafka's "topics named so far"
        assert set(publisher.written_topics) <= tracked
        assert f"app-{unique_name}-chat-state-changelog" in publisher.written_topics

        await create_topics(kafka_bootstrap, [late], partitions=1)
        await asyncio.wait_for(await producer.send(late, b"k", b"v", None, None, None), 30)
        sent = await publisher.send_delta(_delta(1), [])
        try:
            await asyncio.wait_for(sent, 30)
        except TimeoutError:
            pytest.fail("the second delta was never acknowledged: its partition stalled")
    finally:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(producer.stop(), 10)
