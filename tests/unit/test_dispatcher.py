"""The dispatcher in-process: key order, in-order acks, backpressure, copies, and the release.

The dispatcher runs with its real scheduler, request lifecycle and request handler. Faust's stream
and consumer, Vapi, the Kafka publisher and the table are small fakes typed by the dispatcher's
own Protocols; each can hold a request at one point (its Vapi stream, its final response) until
the test lets it go. Faust's consumer keeps every message it handed over in ``unacked`` until it
is acked; its drain waits for that set to empty.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Awaitable, Sequence
from dataclasses import dataclass, field

import pytest
from aiokafka.structs import TopicPartition
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from worker.config import Settings
from worker.dispatcher import FINAL_STEPS_CUT_OFF, Dispatcher
from worker.errors import InvalidRequestError, VapiStatusError
from worker.lifecycle import Event, RequestLifecycle
from worker.messages import ChatDelta, ChatResponse
from worker.metrics import WorkerMetrics
from worker.pipeline import HandlerSettings, RequestHandler
from worker.retry import RetryPolicy, SharedBackoff
from worker.state import ConversationState
from worker.vapi.events import StreamDelta

pytestmark = [pytest.mark.unit, pytest.mark.timeout(20)]

TOPIC = "chat.requests"


class Gates:
    """Per request id, an optional gate a fake waits at until the test opens it."""

    def __init__(self) -> None:
        self._gates: dict[str, asyncio.Event] = {}
        self.reached: set[str] = set()

    def hold(self, request_id: str) -> None:
        self._gates[request_id] = asyncio.Event()

    def open(self, request_id: str) -> None:
        self._gates[request_id].set()

    async def pass_(self, request_id: str) -> None:
        self.reached.add(request_id)
        gate = self._gates.get(request_id)
        if gate is not None:
            await gate.wait()


@dataclass
class Vapi:
    """Answers every call with one delta; a held request's stream stays open until opened."""

    gates: Gates = field(default_factory=Gates)
    calls: list[str] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)

    async def stream_chat(
        self, body: dict[str, object], *, request_id: str, attempt: int
    ) -> AsyncGenerator[StreamDelta, None]:
        self.calls.append(request_id)
        try:
            yield StreamDelta(
                chat_id=f"chat-{request_id}", path="chat.output[0].content", delta="Hi"
            )
            await self.gates.pass_(request_id)
        except (GeneratorExit, asyncio.CancelledError):
            self.closed.append(request_id)
            raise


@dataclass
class Publisher:
    """Records outputs; a held request's final response waits until opened."""

    gates: Gates = field(default_factory=Gates)
    responses: list[str] = field(default_factory=list)
    finals: dict[str, ChatResponse] = field(default_factory=dict)
    flushed: list[float] = field(default_factory=list)

    async def send_delta(
        self, delta: ChatDelta, headers: Sequence[tuple[str, bytes]]
    ) -> Awaitable[object]:
        ack: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        ack.set_result(None)
        return ack

    async def send_response(
        self, response: ChatResponse, headers: Sequence[tuple[str, bytes]]
    ) -> None:
        await self.gates.pass_(response.request_id)
        self.responses.append(response.request_id)
        self.finals[response.request_id] = response

    async def send_dead_letter(self, event: Event, error: InvalidRequestError) -> None:
        self.responses.append(f"dlq:{event.message.offset}")

    async def flush_within(self, timeout_s: float) -> bool:
        self.flushed.append(timeout_s)
        return True

    async def drop_held_records(self, reason: str) -> dict[str, int]:
        raise AssertionError("nothing is held")


@dataclass
class Store:
    states: dict[str, ConversationState] = field(default_factory=dict)
    partitions: list[int] = field(default_factory=list)

    def get(self, conversation_id: str) -> ConversationState:
        return self.states.get(conversation_id, ConversationState())

    async def put(self, conversation_id: str, state: ConversationState, partition: int) -> None:
        self.partitions.append(partition)
        self.states[conversation_id] = state


@dataclass(eq=False)
class Message:
    tp: TopicPartition
    offset: int
    value: bytes
    key: bytes | None = None
    headers: list[tuple[str, bytes | None]] = field(default_factory=list)
    timestamp: float | None = 1_700_000_000.0

    @property
    def topic(self) -> str:
        return self.tp.topic

    @property
    def partition(self) -> int:
        return self.tp.partition


@dataclass(eq=False)
class FakeEvent:
    message: Message


@dataclass
class Consumer:
    """Faust's consumer: every message handed over stays unacked until acked."""

    unacked: set[object] = field(default_factory=set)


@dataclass
class Stream:
    consumer: Consumer
    acked: list[tuple[int, int]] = field(default_factory=list)

    async def ack(self, event: FakeEvent) -> bool:
        self.acked.append((event.message.partition, event.message.offset))
        self.consumer.unacked.discard(event.message)
        return True


@dataclass
class Rig:
    dispatcher: Dispatcher
    vapi: Vapi
    publisher: Publisher
    store: Store
    consumer: Consumer
    stream: Stream
    metrics: WorkerMetrics
    offsets: dict[int, int] = field(default_factory=dict)

    def record(
        self, conversation: str, request_id: str, partition: int = 0, **fields: object
    ) -> FakeEvent:
        """The next record of ``partition``, as Faust hands it over (unacked from now on)."""
        return self.raw(
            conversation,
            {"request_id": request_id, "conversation_id": conversation, "input": "hi", **fields},
            partition,
        )

    def cancel(
        self, conversation: str, request_id: str | None = None, partition: int = 0
    ) -> FakeEvent:
        """The next record of ``partition``: a chat.cancel.v1."""
        body = {"schema": "chat.cancel.v1", "conversation_id": conversation}
        return self.raw(conversation, {**body, "request_id": request_id}, partition)

    def raw(self, key: str, body: dict[str, object], partition: int = 0) -> FakeEvent:
        offset = self.offsets.get(partition, 0)
        self.offsets[partition] = offset + 1
        value = json.dumps(body)
        message = Message(TopicPartition(TOPIC, partition), offset, value.encode(), key.encode())
        self.consumer.unacked.add(message)
        return FakeEvent(message)

    async def take(self, event: FakeEvent) -> None:
        await asyncio.wait_for(self.dispatcher.take(self.stream, event), 5)

    async def settled(self) -> None:
        """Wait until no started record's task is running."""
        for _ in range(200):
            running = [
                job.task
                for job in self.dispatcher._jobs.values()
                if job.task is not None and not job.task.done()
            ]
            if not running:
                await asyncio.sleep(0)
                return
            await asyncio.wait(running, timeout=0.05)
        pytest.fail("records still running")

    def lag(self, partition: int) -> float | None:
        return self.metrics.registry.get_sample_value(
            "chat_worker_consumer_lag", {"partition": str(partition)}
        )


def make_rig(
    policy: RetryPolicy | None = None, vapi: Vapi | None = None, **settings: object
) -> Rig:
    config = Settings(topic_requests=TOPIC, **settings)  # type: ignore[arg-type]
    metrics = WorkerMetrics(CollectorRegistry())
    vapi = vapi or Vapi()
    publisher, store, consumer = Publisher(), Store(), Consumer()
    handler = RequestHandler(
        vapi,
        publisher,
        policy or RetryPolicy(max_attempts=1, base_delay_s=0, max_delay_s=0),
        SharedBackoff(),
        metrics,
        HandlerSettings(default_assistant_id="sim-assistant"),
    )

    async def on_crash(exc: BaseException) -> None:
        raise AssertionError(f"the worker stopped: {exc!r}")

    lifecycle = RequestLifecycle(config, handler, store, publisher, metrics, on_crash)
    dispatcher = Dispatcher(config, lifecycle, publisher, metrics, consumer=lambda: consumer)
    return Rig(dispatcher, vapi, publisher, store, consumer, Stream(consumer), metrics)


async def until(condition: object, what: str) -> None:
    for _ in range(500):
        if callable(condition) and condition():
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"never: {what}")


async def test_acks_go_back_in_offset_order_however_the_records_finish() -> None:
    """Three conversations on one partition; the first finishes last: nothing is acked before
    it, then all three at once, in offset order."""
    rig = make_rig()
    rig.vapi.gates.hold("a-1")
    for conversation in ("a", "b", "c"):
        await rig.take(rig.record(conversation, f"{conversation}-1"))
    await until(lambda: set(rig.publisher.responses) == {"b-1", "c-1"}, "b-1 and c-1 answered")
    assert rig.stream.acked == []
    rig.vapi.gates.open("a-1")
    await rig.settled()
    assert rig.publisher.responses == ["b-1", "c-1", "a-1"]
    assert rig.stream.acked == [(0, 0), (0, 1), (0, 2)]
    assert rig.consumer.unacked == set()


async def test_a_conversation_runs_one_record_at_a_time_and_a_waiting_one_has_no_task() -> None:
    """The second turn waits for the first, without a task of its own until it starts."""
    rig = make_rig()
    rig.vapi.gates.hold("a-1")
    first, second = rig.record("a", "a-1"), rig.record("a", "a-2")
    await rig.take(first)
    await rig.take(second)
    await until(lambda: "a-1" in rig.vapi.gates.reached, "a-1 streaming")
    jobs = list(rig.dispatcher._jobs.values())
    assert [job.task is not None for job in jobs] == [True, False]
    assert rig.vapi.calls == ["a-1"]
    rig.vapi.gates.open("a-1")
    await rig.settled()
    assert rig.vapi.calls == ["a-1", "a-2"]
    assert rig.store.get("a").finished == ("a-1", "a-2")
    assert rig.store.partitions == [0, 0], "each write names its request's partition"
    assert rig.stream.acked == [(0, 0), (0, 1)]


async def test_a_full_buffer_holds_the_agent_until_a_record_finishes() -> None:
    """At WORKER_MAX_BUFFERED records taken and unfinished, ``take`` waits (backpressure)."""
    rig = make_rig(worker_max_buffered=2)
    rig.vapi.gates.hold("a-1")
    rig.vapi.gates.hold("b-1")
    await rig.take(rig.record("a", "a-1"))
    await rig.take(rig.record("b", "b-1"))
    third = asyncio.create_task(rig.dispatcher.take(rig.stream, rig.record("c", "c-1")))
    await until(lambda: {"a-1", "b-1"} <= rig.vapi.gates.reached, "a-1 and b-1 streaming")
    await asyncio.sleep(0.05)
    assert not third.done(), "a third record was taken with the buffer full"
    rig.vapi.gates.open("b-1")
    await asyncio.wait_for(third, 5)
    rig.vapi.gates.open("a-1")
    await rig.settled()
    assert sorted(rig.publisher.responses) == ["a-1", "b-1", "c-1"]
    assert rig.stream.acked == [(0, 0), (0, 1), (0, 2)]


async def test_a_record_handed_over_twice_runs_once_and_its_copy_is_not_acked() -> None:
    """A copy (an offset at or below the last one taken) leaves Faust's unacked set, unacked;
    the original runs once and is acked once."""
    rig = make_rig()
    rig.vapi.gates.hold("a-1")
    original = rig.record("a", "a-1")
    await rig.take(original)
    copy = FakeEvent(Message(original.message.tp, 0, original.message.value, b"a"))
    rig.consumer.unacked.add(copy.message)
    with capture_logs() as logs:
        await rig.take(copy)
    assert copy.message not in rig.consumer.unacked
    assert original.message in rig.consumer.unacked
    assert any(line["event"] == "record delivered twice, copy skipped" for line in logs)
    rig.vapi.gates.open("a-1")
    await rig.settled()
    assert rig.vapi.calls == ["a-1"]
    assert rig.publisher.responses == ["a-1"]
    assert rig.stream.acked == [(0, 0)]


async def test_a_release_cancels_running_requests_and_leaves_unfinished_records_unacked() -> None:
    """Past the grace period a streaming request is cancelled (its Vapi stream closed) and a
    waiting one never starts; neither is acked, both leave Faust's unacked set, and the lag
    series of the released partitions go. A finished record is acked as usual."""
    rig = make_rig()
    rig.vapi.gates.hold("a-1")
    await rig.take(rig.record("a", "a-1", partition=0))
    await rig.take(rig.record("a", "a-2", partition=0))
    await rig.take(rig.record("b", "b-1", partition=1))
    await until(lambda: rig.stream.acked == [(1, 0)], "b-1 acked")
    rig.metrics.set_consumer_lag(0, 2)
    rig.metrics.set_consumer_lag(1, 0)
    assert await rig.dispatcher.release(grace_s=0.05)
    assert rig.vapi.closed == ["a-1"]
    assert rig.vapi.calls == ["a-1", "b-1"]
    assert rig.stream.acked == [(1, 0)]
    assert rig.consumer.unacked == set(), "Faust's drain would wait for them"
    assert rig.dispatcher._jobs == {}
    assert rig.dispatcher.scheduler.buffered == 0
    assert (rig.lag(0), rig.lag(1)) == (None, None)


async def test_a_final_step_under_way_at_a_release_finishes_in_the_bound_and_is_acked() -> None:
    """The request is cancelled past its grace period while its final response is being
    published: the step goes on (shielded), the state is written, and the record is acked."""
    rig = make_rig(worker_finish_timeout_s=5.0)
    rig.publisher.gates.hold("a-1")
    await rig.take(rig.record("a", "a-1"))
    await until(lambda: "a-1" in rig.publisher.gates.reached, "a-1 in its final step")
    release = asyncio.create_task(rig.dispatcher.release(grace_s=0))
    await asyncio.sleep(0.05)
    assert not release.done(), "the release did not wait for the final step"
    rig.publisher.gates.open("a-1")
    assert await asyncio.wait_for(release, 5)
    assert rig.publisher.responses == ["a-1"]
    assert rig.store.get("a").finished == ("a-1",)
    assert rig.stream.acked == [(0, 0)]


async def test_a_final_step_past_the_bound_is_cut_off_and_left_unacked() -> None:
    """A final response that does not go out within WORKER_FINISH_TIMEOUT_S is cut off: logged
    with its request id, no state written, the record left for redelivery."""
    rig = make_rig(worker_finish_timeout_s=0.2)
    rig.publisher.gates.hold("a-1")
    await rig.take(rig.record("a", "a-1"))
    await until(lambda: "a-1" in rig.publisher.gates.reached, "a-1 in its final step")
    with capture_logs() as logs:
        assert await asyncio.wait_for(rig.dispatcher.release(grace_s=0), 5)
    (line,) = [entry for entry in logs if entry["event"] == FINAL_STEPS_CUT_OFF]
    assert (line["final_steps"], line["request_ids"]) == (1, ["a-1"])
    assert rig.publisher.responses == []
    assert rig.store.states == {}
    assert rig.stream.acked == []
    assert rig.consumer.unacked == set()


# --- cancels (docs/design.md §5.8) ------------------------------------------------------------


async def test_a_cancel_ends_the_streaming_request_and_a_queued_one_without_a_call() -> None:
    """A cancel taken behind its conversation's records cancels the streaming one (its stream
    closed, held by no gate) and the queued one (never called); both end ``cancelled``, in
    order; every record, the cancel included, is acked in offset order."""
    rig = make_rig()
    rig.vapi.gates.hold("a-1")
    await rig.take(rig.record("a", "a-1"))
    await rig.take(rig.record("a", "a-2"))
    await until(lambda: "a-1" in rig.vapi.gates.reached, "a-1 streaming")
    await rig.take(rig.cancel("a"))
    await rig.settled()
    assert rig.vapi.closed == ["a-1"]
    assert rig.vapi.calls == ["a-1"], "the queued request called Vapi"
    assert rig.publisher.responses == ["a-1", "a-2"]
    first, second = rig.publisher.finals["a-1"], rig.publisher.finals["a-2"]
    assert (first.status, first.text, first.delta_count, first.chat_id) == (
        "cancelled",
        "Hi",
        1,
        "chat-a-1",
    )
    assert first.error is not None
    assert first.error.code == "cancelled"
    assert (second.status, second.attempts, second.chat_id) == ("cancelled", 0, None)
    assert rig.stream.acked == [(0, 0), (0, 1), (0, 2)]
    state = rig.store.get("a")
    assert state.finished == ("a-1", "a-2")
    assert state.chat_id is None, "a cancelled turn became the conversation's context"
    counted = rig.metrics.registry.get_sample_value
    assert counted("chat_worker_requests_total", {"outcome": "cancelled"}) == 2
    assert counted("chat_worker_cancels_total", {"effect": "cancelled"}) == 1
    assert counted("chat_worker_cancel_seconds_count", {}) == 1


async def test_a_cancel_reaches_only_its_request_its_conversation_and_what_came_before() -> None:
    """By request_id: only that request; another conversation on the partition and a request
    taken after the cancel run as usual; a cancel matching nothing is counted ``none``."""
    rig = make_rig()
    rig.vapi.gates.hold("a-1")
    await rig.take(rig.record("a", "a-1"))
    await rig.take(rig.record("a", "a-2"))
    await rig.take(rig.record("b", "b-1"))
    await until(lambda: "a-1" in rig.vapi.gates.reached, "a-1 streaming")
    await rig.take(rig.cancel("a", "a-2"))
    await rig.take(rig.cancel("c"))
    await rig.take(rig.record("a", "a-3"))
    rig.vapi.gates.open("a-1")
    await rig.settled()
    statuses = {rid: final.status for rid, final in rig.publisher.finals.items()}
    assert statuses == {
        "a-1": "completed",
        "a-2": "cancelled",
        "b-1": "completed",
        "a-3": "completed",
    }
    assert rig.vapi.calls == ["a-1", "b-1", "a-3"]
    assert rig.stream.acked == [(0, n) for n in range(6)]
    counted = rig.metrics.registry.get_sample_value
    assert counted("chat_worker_cancels_total", {"effect": "cancelled"}) == 1
    assert counted("chat_worker_cancels_total", {"effect": "none"}) == 1


async def test_a_cancel_in_the_final_step_is_too_late() -> None:
    """A request publishing its final response is finished for a cancel: it stays completed."""
    rig = make_rig()
    rig.publisher.gates.hold("a-1")
    await rig.take(rig.record("a", "a-1"))
    await until(lambda: "a-1" in rig.publisher.gates.reached, "a-1 in its final step")
    await rig.take(rig.cancel("a", "a-1"))
    rig.publisher.gates.open("a-1")
    await rig.settled()
    assert rig.publisher.finals["a-1"].status == "completed"
    assert rig.store.get("a").chat_id == "chat-a-1"
    counted = rig.metrics.registry.get_sample_value
    assert counted("chat_worker_cancels_total", {"effect": "none"}) == 1


async def test_a_superseding_request_cancels_the_earlier_ones_then_runs_on_their_context() -> None:
    """supersede: the streaming and the queued earlier requests end ``superseded``; the new one
    runs from the conversation's chat before them; a redelivered copy of the superseding
    request does not cancel it."""
    rig = make_rig()
    await rig.take(rig.record("a", "a-0"))
    await rig.settled()
    rig.vapi.gates.hold("a-1")
    await rig.take(rig.record("a", "a-1"))
    await rig.take(rig.record("a", "a-2"))
    await until(lambda: "a-1" in rig.vapi.gates.reached, "a-1 streaming")
    await rig.take(rig.record("a", "a-3", supersede=True))
    await rig.take(rig.record("a", "a-3", supersede=True))
    await rig.settled()
    finals = rig.publisher.finals
    assert [finals[r].status for r in ("a-0", "a-1", "a-2", "a-3")] == [
        "completed",
        "cancelled",
        "cancelled",
        "completed",
    ]
    assert {finals[r].error.code for r in ("a-1", "a-2") if finals[r].error} == {"superseded"}
    assert finals["a-3"].previous_chat_id == "chat-a-0"
    assert rig.vapi.calls == ["a-0", "a-1", "a-3"]
    assert rig.publisher.responses.count("a-3") == 1, "the copy ran again"
    assert rig.stream.acked == [(0, n) for n in range(5)]


@dataclass
class FailingVapi(Vapi):
    """Every call breaks with a 503 after one delta."""

    async def stream_chat(
        self, body: dict[str, object], *, request_id: str, attempt: int
    ) -> AsyncGenerator[StreamDelta, None]:
        self.calls.append(request_id)
        yield StreamDelta(chat_id=f"chat-{attempt}", path="chat.output[0].content", delta="Hi")
        raise VapiStatusError("Vapi returned 503", http_status=503)


async def test_a_cancel_during_a_retry_pause_ends_the_request_without_another_call() -> None:
    """A request waiting to retry is still running: a cancel ends it now, with the text of the
    attempt before, and no further attempt is made."""
    policy = RetryPolicy(max_attempts=5, base_delay_s=60, max_delay_s=60)
    rig = make_rig(policy, FailingVapi())
    await rig.take(rig.record("a", "a-1"))
    await until(lambda: rig.vapi.calls == ["a-1"], "a-1's first attempt")
    await asyncio.sleep(0.05)
    await rig.take(rig.cancel("a", "a-1"))
    await rig.settled()
    final = rig.publisher.finals["a-1"]
    assert (final.status, final.attempts, final.text, final.chat_id) == (
        "cancelled",
        1,
        "Hi",
        "chat-1",
    )
    assert rig.vapi.calls == ["a-1"]
    assert rig.stream.acked == [(0, 0), (0, 1)]


async def test_a_release_still_cuts_a_request_off_unacked_when_nothing_cancelled_it() -> None:
    """Only a cancel's mark turns a task cancellation into a ``cancelled`` response: a release
    leaves the request without a response and unacked, for its next owner."""
    rig = make_rig()
    rig.vapi.gates.hold("a-1")
    await rig.take(rig.record("a", "a-1"))
    await rig.take(rig.cancel("b"))
    await until(lambda: "a-1" in rig.vapi.gates.reached, "a-1 streaming")
    assert await rig.dispatcher.release(grace_s=0.01)
    assert rig.publisher.responses == []
    assert rig.stream.acked == []
