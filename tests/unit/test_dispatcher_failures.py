"""A request's one rule for failures: only the loss of Kafka stops the worker.

The dispatcher and the request lifecycle run here with their real scheduler and request
handler; Faust's stream, the Kafka publisher and the table are small fakes recording what they
were asked (no I/O). A failure of any other kind, a bug included, ends its one request (a
``failed`` response with ``internal_error`` when none was published yet), is counted and logged,
and the record is acked, so the partition's next record runs.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from aiokafka.errors import KafkaTimeoutError
from aiokafka.structs import TopicPartition
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from worker.config import Settings
from worker.dispatcher import Dispatcher
from worker.errors import InvalidRequestError
from worker.lifecycle import RequestLifecycle
from worker.messages import ChatDelta, ChatResponse
from worker.metrics import WorkerMetrics
from worker.pipeline import HandlerSettings, RequestHandler
from worker.retry import RetryPolicy, SharedBackoff
from worker.state import ConversationState
from worker.vapi.events import StreamDelta

pytestmark = [pytest.mark.unit, pytest.mark.timeout(10)]

TP = TopicPartition("chat.requests", 0)


class Streamer:
    """Vapi, answering every call with two deltas."""

    async def stream_chat(
        self, body: dict[str, object], *, request_id: str, attempt: int
    ) -> AsyncGenerator[StreamDelta, None]:
        for word in ("Hello", " there"):
            yield StreamDelta(
                chat_id=f"chat-{request_id}", path="chat.output[0].content", delta=word
            )


@dataclass
class Publisher:
    """Records outputs; ``fail_response`` / ``fail_dead_letter`` raise on the next call only."""

    responses: list[ChatResponse] = field(default_factory=list)
    dead_letters: list[str] = field(default_factory=list)
    fail_response: Exception | None = None
    fail_dead_letter: Exception | None = None

    async def send_delta(
        self, delta: ChatDelta, headers: Sequence[tuple[str, bytes]]
    ) -> Awaitable[object]:
        ack: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        ack.set_result(None)
        return ack

    async def send_response(
        self, response: ChatResponse, headers: Sequence[tuple[str, bytes]]
    ) -> None:
        failure, self.fail_response = self.fail_response, None
        if failure is not None:
            raise failure
        self.responses.append(response)

    async def send_dead_letter(self, event: Any, error: InvalidRequestError) -> None:
        failure, self.fail_dead_letter = self.fail_dead_letter, None
        if failure is not None:
            raise failure
        self.dead_letters.append(error.reason)

    async def flush_within(self, timeout_s: float) -> bool:
        return True


@dataclass
class Store:
    """The conversation table; ``fail_put`` raises on the next write only."""

    states: dict[str, ConversationState] = field(default_factory=dict)
    fail_put: Exception | None = None

    def get(self, conversation_id: str) -> ConversationState:
        return self.states.get(conversation_id, ConversationState())

    async def put(self, conversation_id: str, state: ConversationState, partition: int) -> None:
        failure, self.fail_put = self.fail_put, None
        if failure is not None:
            raise failure
        self.states[conversation_id] = state


@dataclass
class Message:
    offset: int
    value: bytes
    key: bytes = b"c1"
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    tp: TopicPartition = TP
    topic: str = TP.topic
    partition: int = TP.partition
    #: Seconds, as Faust gives a record's timestamp.
    timestamp: float = 1_700_000_000.0


@dataclass
class Event:
    message: Message


@dataclass
class Stream:
    """Faust's stream as the dispatcher uses it: acks, in order."""

    acked: list[int] = field(default_factory=list)

    async def ack(self, event: Event) -> bool:
        self.acked.append(event.message.offset)
        return True


async def settled(dispatcher: Dispatcher) -> None:
    """Wait until every started record's task has ended (tasks start as records get their turn)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while True:
        tasks = [job.task for job in dispatcher._jobs.values() if job.task is not None]
        running = [task for task in tasks if not task.done()]
        if not running:
            await asyncio.sleep(0)  # the last completion's acks
            return
        _, stalled = await asyncio.wait(running, timeout=max(deadline - loop.time(), 0))
        assert not stalled, f"{len(stalled)} records never ran: the partition stalled"


@dataclass
class Rig:
    dispatcher: Dispatcher
    publisher: Publisher
    store: Store
    stream: Stream
    metrics: WorkerMetrics
    crashes: list[BaseException]

    async def take(self, *values: bytes) -> None:
        """Hand the records to the dispatcher, in offset order, and wait until each has run."""
        for offset, value in enumerate(values, start=len(self.stream.acked)):
            await self.dispatcher.take(self.stream, Event(Message(offset, value)))
        await settled(self.dispatcher)

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        assert value is not None, f"no sample {name}{labels}"
        return value


@pytest.fixture
def rig() -> Rig:
    settings = Settings()
    metrics = WorkerMetrics(CollectorRegistry())
    publisher, store, crashes = Publisher(), Store(), []
    handler = RequestHandler(
        Streamer(),
        publisher,
        RetryPolicy(max_attempts=1, base_delay_s=0, max_delay_s=0),
        SharedBackoff(),
        metrics,
        HandlerSettings(default_assistant_id="sim-assistant"),
    )

    async def on_crash(exc: BaseException) -> None:
        crashes.append(exc)

    lifecycle = RequestLifecycle(settings, handler, store, cast(Any, publisher), metrics, on_crash)
    dispatcher = Dispatcher(settings, lifecycle, publisher, metrics, consumer=lambda: None)
    return Rig(dispatcher, publisher, store, Stream(), metrics, crashes)


def request(request_id: str) -> bytes:
    return json.dumps({"request_id": request_id, "conversation_id": "c1", "input": "hi"}).encode()


async def test_a_bug_publishing_the_response_ends_the_request_with_internal_error(
    rig: Rig,
) -> None:
    """The response could not be published (a bug): a failed one takes its place, acked."""
    rig.publisher.fail_response = TypeError("a bug while publishing")
    with capture_logs() as logs:
        await rig.take(request("r1"), request("r2"))
    assert rig.crashes == []
    first, second = rig.publisher.responses
    assert (first.request_id, first.status) == ("r1", "failed")
    assert first.error is not None
    assert first.error.code == "internal_error"
    assert (second.request_id, second.status) == ("r2", "completed")
    assert rig.stream.acked == [0, 1]
    assert rig.store.get("c1").finished == ("r1", "r2")
    assert rig.sample("chat_worker_internal_errors_total") == 1
    counted = [rig.sample("chat_worker_requests_total", outcome=o) for o in ("completed", "failed")]
    assert sum(counted) == 2, "each request is counted once"
    assert any(isinstance(line.get("exc_info"), TypeError) for line in logs)


async def test_a_bug_recording_the_state_after_the_response_is_counted_and_acked(
    rig: Rig,
) -> None:
    """The response is out; the table write failed on a bug: no second response, record acked."""
    rig.store.fail_put = RuntimeError("a bug in the table write")
    await rig.take(request("r1"), request("r2"))
    assert rig.crashes == []
    assert [(r.request_id, r.status) for r in rig.publisher.responses] == [
        ("r1", "completed"),
        ("r2", "completed"),
    ]
    assert rig.stream.acked == [0, 1]
    assert rig.sample("chat_worker_internal_errors_total") == 1


async def test_a_bug_dead_lettering_a_record_is_counted_and_the_partition_goes_on(
    rig: Rig,
) -> None:
    """The DLQ write failed on a bug: logged and counted, the record acked, the next one runs."""
    rig.publisher.fail_dead_letter = ValueError("a bug in the dead-letter path")
    await rig.take(b"not json", request("r2"))
    assert rig.crashes == []
    assert [(r.request_id, r.status) for r in rig.publisher.responses] == [("r2", "completed")]
    assert rig.stream.acked == [0, 1]
    assert rig.sample("chat_worker_internal_errors_total") == 1


@pytest.mark.parametrize("where", ["response", "dead_letter", "table"])
async def test_the_loss_of_kafka_stops_the_worker_and_acks_nothing(rig: Rig, where: str) -> None:
    """A Kafka error on an output or the table write is the one failure that stops the worker."""
    lost = KafkaTimeoutError("no broker answered")
    if where == "response":
        rig.publisher.fail_response = lost
    elif where == "dead_letter":
        rig.publisher.fail_dead_letter = lost
    else:
        rig.store.fail_put = lost
    await rig.take(b"not json" if where == "dead_letter" else request("r1"))
    assert rig.crashes == [lost]
    assert rig.stream.acked == []
    assert rig.sample("chat_worker_internal_errors_total") == 0


async def test_records_handed_over_between_a_release_and_the_next_assignment_are_not_taken(
    rig: Rig,
) -> None:
    """After a release no partition belongs to the worker until Faust assigns again: a record
    Faust hands over in between (its recovery of the revoked assignment can resume the flow) is
    left unacked for its redelivery, not run; once assigned, records run again."""
    await rig.take(request("r1"))
    await rig.dispatcher.release(grace_s=0)
    await rig.dispatcher.take(rig.stream, Event(Message(1, request("r2"))))
    assert rig.dispatcher._jobs == {}
    assert [r.request_id for r in rig.publisher.responses] == ["r1"]
    rig.dispatcher.on_assigned()
    await rig.dispatcher.take(rig.stream, Event(Message(1, request("r2"))))
    await settled(rig.dispatcher)
    assert [r.request_id for r in rig.publisher.responses] == ["r1", "r2"]
    assert rig.stream.acked == [0, 1]
