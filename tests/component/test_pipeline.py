"""RequestHandler against the real simulator and the real VapiClient: Vapi's faults, one by one.

A request runs as the dispatcher runs it, through its lifecycle (``worker.lifecycle``). Only the
output side and the table are fakes (``RecordingPublisher``, ``MemoryStore``): every HTTP exchange
is real. Sleeping is injected (``FakeTime``): the handler asks for a delay, the test records it and
moves a virtual clock instead of waiting, so Retry-After and backoff are checked by value, not by
wall-clock time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import socket
import time
from collections import defaultdict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate

import pytest
from aiokafka.errors import KafkaTimeoutError
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from structlog.testing import capture_logs

from worker.config import Settings
from worker.errors import InvalidRequestError
from worker.lifecycle import Record, RequestLifecycle
from worker.limits import MAX_DELTA_TEXT_BYTES, json_text_bytes
from worker.messages import ChatDelta, ChatRequest, ChatResponse
from worker.metrics import WorkerMetrics
from worker.pipeline import DELTA_COUNT_BATCH, ChatStreamer, HandlerSettings, RequestHandler
from worker.reply_check import ReplyChecker
from worker.retry import RetryPolicy, SharedBackoff
from worker.simulator.server import RunningSimulator, SimulatorConfig, serve_simulator
from worker.state import ConversationState
from worker.vapi.client import VapiClient, VapiTimeouts
from worker.vapi.events import StreamDelta

pytestmark = [pytest.mark.component, pytest.mark.timeout(30)]

KEY = "sk-component-3c59dc048e885024"
ROOMY = VapiTimeouts(connect_s=2, first_delta_s=5, stall_s=5, request_s=10)
FAST_RETRIES = RetryPolicy(max_attempts=4, base_delay_s=0.01, max_delay_s=0.05)
#: The same, honouring a Retry-After of up to an hour.
PATIENT_RETRIES = dataclasses.replace(FAST_RETRIES, retry_after_max_s=3600)
CONVERSATION = "conv-1"


# --- collaborators -------------------------------------------------------------------------------


@dataclass
class FakeTime:
    """An injected clock and sleep: sleeping records the delay and (by default) skips it.

    ``clock()`` is the real monotonic clock plus every skipped delay, so the handler's deadline
    arithmetic sees the time it asked to wait. With ``advance=False`` the clock stays real, which
    keeps a shared backoff pause in force for every request after one request "slept" through it.
    """

    advance: bool = True
    skipped: float = 0.0
    sleeps: list[tuple[str, float]] = field(default_factory=list)

    def clock(self) -> float:
        return time.monotonic() + self.skipped

    async def sleep(self, delay: float) -> None:
        task = asyncio.current_task()
        self.sleeps.append((task.get_name() if task is not None else "", delay))
        if self.advance:
            self.skipped += delay
        await asyncio.sleep(0)

    def delays(self, task_name: str | None = None) -> list[float]:
        return [delay for name, delay in self.sleeps if task_name in (None, name)]


class RecordingPublisher:
    """Records what the handler publishes; can hold a request's deltas until released."""

    def __init__(self) -> None:
        self.deltas: list[ChatDelta] = []
        self.responses: list[ChatResponse] = []
        #: The record headers each delta and each response was sent with, in order.
        self.delta_headers: list[list[tuple[str, bytes]]] = []
        self.response_headers: list[list[tuple[str, bytes]]] = []
        self._holds: dict[str, asyncio.Event] = {}
        self._arrived: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)

    async def send_delta(
        self, delta: ChatDelta, headers: Sequence[tuple[str, bytes]]
    ) -> Awaitable[object]:
        self.deltas.append(delta)
        self.delta_headers.append(list(headers))
        self._arrived[delta.request_id].set()
        hold = self._holds.get(delta.request_id)
        if hold is not None:
            await hold.wait()
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ack.set_result(None)
        return ack

    async def send_response(
        self, response: ChatResponse, headers: Sequence[tuple[str, bytes]]
    ) -> None:
        self.responses.append(response)
        self.response_headers.append(list(headers))

    async def send_dead_letter(self, event: object, error: InvalidRequestError) -> None:
        raise AssertionError("no dead letters here")

    def hold(self, request_id: str) -> None:
        self._holds[request_id] = asyncio.Event()

    def release(self, request_id: str) -> None:
        self._holds.pop(request_id).set()

    async def first_delta(self, request_id: str) -> None:
        await asyncio.wait_for(self._arrived[request_id].wait(), timeout=10)

    def deltas_of(self, request_id: str, attempt: int) -> list[ChatDelta]:
        return [d for d in self.deltas if d.request_id == request_id and d.attempt == attempt]

    def responses_of(self, request_id: str) -> list[ChatResponse]:
        return [r for r in self.responses if r.request_id == request_id]


class _Ceiling(random.Random):
    """Full jitter pinned to its ceiling, so a retry delay is exactly ``min(max, base * 2**n)``."""

    def uniform(self, a: float, b: float) -> float:
        return b


@dataclass
class MemoryStore:
    """The conversations' table, in a dict."""

    states: dict[str, ConversationState] = field(default_factory=dict)

    def get(self, conversation_id: str) -> ConversationState:
        return self.states.get(conversation_id, ConversationState())

    async def put(self, conversation_id: str, state: ConversationState, partition: int) -> None:
        self.states[conversation_id] = state


@dataclass
class _Message:
    """The request's record, as far as the lifecycle reads it."""

    tp: tuple[str, int] = ("chat.requests", 0)
    topic: str = "chat.requests"
    partition: int = 0
    offset: int = 0
    key: bytes | None = None
    value: bytes | None = None
    headers: list[tuple[str, bytes | None]] | None = None
    timestamp: float | None = None


@dataclass
class _Event:
    message: _Message


@dataclass
class Rig:
    """One handler with its collaborators, and a way to run a request to its published response."""

    handler: RequestHandler
    publisher: RecordingPublisher
    metrics: WorkerMetrics
    time: FakeTime
    sim: RunningSimulator
    store: MemoryStore = field(default_factory=MemoryStore)
    crashes: list[BaseException] = field(default_factory=list)

    async def run(
        self,
        text: str,
        *,
        request_id: str = "req-1",
        state: ConversationState | None = None,
        **fields: object,
    ) -> ChatResponse:
        """Run one request to its published response, as the dispatcher does."""
        request = ChatRequest.model_validate(
            {"request_id": request_id, "conversation_id": CONVERSATION, "input": text, **fields}
        )
        return await self.run_request(request, state=state)

    async def run_request(
        self,
        request: ChatRequest,
        *,
        state: ConversationState | None = None,
        trace_headers: Sequence[tuple[str, bytes | None]] = (),
    ) -> ChatResponse:
        """Run ``request`` through its lifecycle; raises what would have stopped the worker."""

        async def crash(exc: BaseException) -> None:
            self.crashes.append(exc)

        if state is not None:
            self.store.states[request.conversation_id] = state
        lifecycle = RequestLifecycle(
            Settings(), self.handler, self.store, self.publisher, self.metrics, crash
        )
        record = Record(_Event(_Message()), self.time.clock(), request, None, trace_headers)
        if not await lifecycle.run(record):
            raise self.crashes[-1]
        return self.publisher.responses_of(request.request_id)[-1]

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        assert value is not None, f"no sample {name}{labels}"
        return value

    def calls(self, request_id: str) -> list[tuple[int | None, int | None]]:
        """(X-Attempt, HTTP status) of every call the simulator saw for ``request_id``."""
        return [(c.attempt, c.status) for c in self.sim.state.calls if c.request_id == request_id]

    def reply_of(self, response: ChatResponse) -> str:
        """The reply the simulator stored for the response's chat."""
        assert response.chat_id is not None
        return str(self.sim.state.chats[response.chat_id].output[0]["content"])


MakeRig = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    """A simulator with no artificial latency on an ephemeral port."""
    config = SimulatorConfig(api_key=KEY, first_token_latency_s=0, inter_token_delay_s=0)
    async with serve_simulator(config, port=0) as running:
        yield running


@pytest.fixture
async def make_rig(sim: RunningSimulator) -> AsyncIterator[MakeRig]:
    """Builds handlers on fresh metrics; closes their clients at the end of the test."""
    async with contextlib.AsyncExitStack() as stack:

        async def build(
            *,
            base_url: str | None = None,
            key: str = KEY,
            timeouts: VapiTimeouts = ROOMY,
            policy: RetryPolicy = FAST_RETRIES,
            deadline_s: float = 300.0,
            advance_clock: bool = True,
            rng: random.Random | None = None,
            coalesce_chars: int = 0,
            coalesce_ms: int = 0,
            max_reply_chars: int = 100_000,
            max_record_bytes: int = 1_000_000,
            wrap_client: Callable[[VapiClient], ChatStreamer] | None = None,
            publisher: RecordingPublisher | None = None,
            fetch_chat: bool = False,
        ) -> Rig:
            metrics = WorkerMetrics(CollectorRegistry())
            client = await stack.enter_async_context(
                VapiClient(
                    base_url or sim.base_url,
                    SecretStr(key),
                    timeouts,
                    on_malformed=lambda _reason: metrics.malformed_events_total.inc(),
                )
            )
            fake_time = FakeTime(advance=advance_clock)
            publisher = publisher or RecordingPublisher()
            handler = RequestHandler(
                client if wrap_client is None else wrap_client(client),
                publisher,
                policy,
                SharedBackoff(),
                metrics,
                HandlerSettings(
                    default_assistant_id="sim-assistant",
                    request_deadline_s=deadline_s,
                    coalesce_chars=coalesce_chars,
                    coalesce_ms=coalesce_ms,
                    max_reply_chars=max_reply_chars,
                    max_record_bytes=max_record_bytes,
                ),
                clock=fake_time.clock,
                sleep=fake_time.sleep,
                rng=rng or random.Random(7),
                reply_checker=ReplyChecker(
                    client,
                    metrics,
                    fetch_timeout_s=timeouts.first_delta_s,
                    clock=fake_time.clock,
                    sleep=fake_time.sleep,
                )
                if fetch_chat
                else None,
            )
            return Rig(handler, publisher, metrics, fake_time, sim)

        yield build


def _closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _assert_completed(rig: Rig, response: ChatResponse, *, attempts: int) -> None:
    """One completed response whose final attempt's deltas (seq from 0) make the reply."""
    assert rig.publisher.responses_of(response.request_id) == [response]
    assert response.status == "completed", response.error
    assert response.error is None
    assert response.attempts == attempts
    final = rig.publisher.deltas_of(response.request_id, attempts)
    assert [d.seq for d in final] == list(range(len(final)))
    assert "".join(d.delta for d in final) == response.text == rig.reply_of(response)
    assert response.delta_count == len(final) > 0
    assert {d.chat_id for d in final} == {response.chat_id}


def _assert_failed(
    rig: Rig,
    response: ChatResponse,
    *,
    code: str,
    retryable: bool,
    http_status: int | None,
    attempts: int,
) -> None:
    """Exactly one failed response, with the full structured error."""
    assert rig.publisher.responses_of(response.request_id) == [response]
    assert response.status == "failed"
    assert response.attempts == attempts
    assert (response.text, response.chat_id, response.delta_count) == ("", None, 0)
    assert response.error is not None
    assert (response.error.code, response.error.retryable, response.error.http_status) == (
        code,
        retryable,
        http_status,
    )
    assert response.error.message.strip()
    assert rig.sample("chat_worker_requests_total", outcome="failed") == 1


# --- rate limits ---------------------------------------------------------------------------------


async def test_429_retry_after_in_seconds_is_honoured(make_rig: MakeRig) -> None:
    """A 429 with Retry-After: 3 is retried after a requested delay of at least 3 seconds."""
    rig = await make_rig()
    response = await rig.run("[[sim:fault status code=429 retry_after=3 times=1]] hi")
    _assert_completed(rig, response, attempts=2)
    assert rig.calls("req-1") == [(1, 429), (2, 200)]
    assert rig.time.delays()[0] >= 3
    assert rig.sample("chat_worker_retries_total", reason="rate_limited") == 1
    assert rig.sample("chat_worker_vapi_responses_total", status="429") == 1


async def test_429_retry_after_as_http_date_is_honoured(make_rig: MakeRig) -> None:
    """A 429 whose Retry-After is an HTTP-date waits at least until that date before retrying."""
    rig = await make_rig()
    until = float(int(time.time()) + 20)
    date = formatdate(until, usegmt=True)
    response = await rig.run(f'[[sim:fault status code=429 retry_after="{date}" times=1]] hi')
    answered = time.time()
    _assert_completed(rig, response, attempts=2)
    assert rig.calls("req-1") == [(1, 429), (2, 200)]
    # The date was read before `answered`, so the wait it asked for is at least this long.
    assert rig.time.delays()[0] >= until - answered


async def test_429_on_one_request_delays_another_requests_next_call(make_rig: MakeRig) -> None:
    """A 429 pauses the shared gate: a concurrent request waits it out before its next call."""
    rig = await make_rig(advance_clock=False, deadline_s=3600, policy=PATIENT_RETRIES)
    rig.publisher.hold("req-b")
    other = asyncio.create_task(
        rig.run("[[sim:fault disconnect after=2 times=1]] bravo", request_id="req-b"),
        name="req-b",
    )
    await rig.publisher.first_delta("req-b")  # req-b's first call is mid-stream, held there
    limited = asyncio.create_task(
        rig.run("[[sim:fault status code=429 retry_after=600 times=1]] alpha", request_id="req-a"),
        name="req-a",
    )
    _assert_completed(rig, await limited, attempts=2)
    rig.publisher.release("req-b")
    _assert_completed(rig, await other, attempts=2)

    assert [status for _, status in rig.calls("req-b")] == [200, 200]  # never limited itself
    # The stream break alone asks for at most max_delay_s; the rest is the other request's pause.
    assert max(rig.time.delays("req-b")) > 300
    assert max(rig.time.delays("req-a")) >= 600


@pytest.mark.parametrize(
    "retry_after", ["99999999999999999999", "Fri, 31 Dec 9999 23:59:59 GMT"], ids=["1e20", "y9999"]
)
async def test_an_absurd_retry_after_pauses_the_worker_for_the_cap_only(
    make_rig: MakeRig, retry_after: str
) -> None:
    """Retry-After of 1e20 s or a date 8000 years ahead: the worker pauses at most the cap (60 s),
    retries, and the requests after it are served, not failed at once."""
    rig = await make_rig()
    fault = f'[[sim:fault status code=429 retry_after="{retry_after}" times=1]]'
    limited = await rig.run(f"{fault} alpha", request_id="req-a")
    _assert_completed(rig, limited, attempts=2)
    assert rig.time.delays() == [60.0]
    later = await rig.run("bravo", request_id="req-b")
    _assert_completed(rig, later, attempts=1)
    assert rig.time.delays() == [60.0], "the pause was over for the next request"
    assert rig.handler.backoff_remaining_s() == 0


# --- server errors and broken connections --------------------------------------------------------


async def test_a_shared_pause_longer_than_the_deadline_fails_the_request_at_once(
    make_rig: MakeRig,
) -> None:
    """A request whose deadline ends inside the worker's 429 pause fails now, without a call."""
    rig = await make_rig(advance_clock=False, deadline_s=60, policy=PATIENT_RETRIES)
    first = await rig.run("[[sim:fault status code=429 retry_after=600]] alpha", request_id="req-a")
    assert first.status == "failed"
    second = await rig.run("bravo", request_id="req-b")
    assert rig.calls("req-b") == []
    assert second.status == "failed"
    assert second.error is not None
    assert (second.error.code, second.error.retryable) == ("vapi_rate_limited", True)
    assert second.attempts == 0
    assert rig.time.delays() == []


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_server_errors_are_retried_then_completed(make_rig: MakeRig, status: int) -> None:
    """Two 5xx answers are retried with backoff, and the third call completes the request."""
    rig = await make_rig()
    response = await rig.run(f"[[sim:fault status code={status} times=2]] hi")
    _assert_completed(rig, response, attempts=3)
    assert rig.calls("req-1") == [(1, status), (2, status), (3, 200)]
    assert len(rig.time.delays()) == 2
    assert all(0 <= d <= FAST_RETRIES.max_delay_s for d in rig.time.delays())
    assert rig.sample("chat_worker_retries_total", reason="server_error") == 2


async def test_connection_refused_is_retried_until_attempts_run_out(make_rig: MakeRig) -> None:
    """Nothing listening: every attempt is made, then one failed response says Vapi is down."""
    rig = await make_rig(base_url=_closed_port_url())
    response = await rig.run("hi")
    _assert_failed(
        rig,
        response,
        code="vapi_connect_error",
        retryable=True,
        http_status=None,
        attempts=FAST_RETRIES.max_attempts,
    )
    assert response.error is not None
    assert "no response from Vapi" in response.error.message
    assert len(rig.time.delays()) == FAST_RETRIES.max_attempts - 1
    assert rig.sample("chat_worker_retries_total", reason="connect") == 3
    assert rig.sample("chat_worker_vapi_responses_total", status="error") == 4


async def test_connection_refused_is_retried_until_the_deadline(make_rig: MakeRig) -> None:
    """Retries stop when the next delay would end past the request deadline, attempts left."""
    policy = RetryPolicy(max_attempts=100, base_delay_s=10, max_delay_s=10)
    rig = await make_rig(base_url=_closed_port_url(), policy=policy, deadline_s=35, rng=_Ceiling())
    response = await rig.run("hi")
    assert response.error is not None
    assert response.error.code == "vapi_connect_error"
    assert 1 < response.attempts < policy.max_attempts
    assert rig.time.delays() == [10.0] * (response.attempts - 1)
    assert sum(rig.time.delays()) <= 35
    _assert_failed(
        rig,
        response,
        code="vapi_connect_error",
        retryable=True,
        http_status=None,
        attempts=response.attempts,
    )


async def test_reset_before_the_first_delta_is_retried(make_rig: MakeRig) -> None:
    """A connection reset before any response byte is retried, and the retry completes."""
    rig = await make_rig()
    response = await rig.run("[[sim:fault reset times=1]] hi")
    _assert_completed(rig, response, attempts=2)
    assert rig.publisher.deltas_of("req-1", 1) == []
    assert [attempt for attempt, _ in rig.calls("req-1")] == [1, 2]
    assert rig.sample("chat_worker_retries_total", reason="connect") == 1


async def test_disconnect_mid_stream_starts_attempt_two_from_seq_zero(make_rig: MakeRig) -> None:
    """After a mid-stream drop, attempt 2 streams from seq 0; attempt 1's deltas stay published."""
    rig = await make_rig()
    response = await rig.run("[[sim:fault disconnect after=3 times=1]] hi")
    _assert_completed(rig, response, attempts=2)
    first = rig.publisher.deltas_of("req-1", 1)
    assert [d.seq for d in first] == [0, 1, 2]
    assert response.text.startswith("".join(d.delta for d in first))
    # Published in order: all of attempt 1, then all of attempt 2.
    assert [d.attempt for d in rig.publisher.deltas] == [1] * 3 + [2] * response.delta_count
    assert rig.sample("chat_worker_retries_total", reason="stream_broken") == 1


async def test_deltas_and_the_response_carry_schema_and_allowlisted_trace_headers(
    make_rig: MakeRig,
) -> None:
    rig = await make_rig()
    request = ChatRequest.model_validate(
        {"request_id": "req-h", "conversation_id": CONVERSATION, "input": "hi"}
    )
    trace = [("traceparent", b"00-abc-def-01"), ("x-secret", b"not echoed")]
    await rig.run_request(request, trace_headers=trace)
    content_type = ("content-type", b"application/json")
    traceparent = ("traceparent", b"00-abc-def-01")
    assert rig.publisher.delta_headers
    for headers in rig.publisher.delta_headers:
        assert headers == [content_type, ("schema", b"chat.delta.v1"), traceparent]
    assert rig.publisher.response_headers == [
        [content_type, ("schema", b"chat.response.v1"), traceparent]
    ]


async def test_every_published_delta_is_counted_across_batches_and_attempts(
    make_rig: MakeRig,
) -> None:
    """deltas_total is added to in batches, and each attempt's remainder at its end, failed too."""
    rig = await make_rig()
    tokens = DELTA_COUNT_BATCH + 5
    response = await rig.run(
        f"[[sim:pace tokens={tokens}]] [[sim:fault disconnect after=3 times=1]]"
    )
    _assert_completed(rig, response, attempts=2)
    assert len(rig.publisher.deltas) == 3 + tokens
    assert rig.sample("chat_worker_deltas_total") == 3 + tokens


async def test_stall_times_out_and_a_new_attempt_completes(make_rig: MakeRig) -> None:
    """A stream that goes quiet longer than stall_s times out, and attempt 2 completes."""
    timeouts = VapiTimeouts(connect_s=2, first_delta_s=5, stall_s=0.3, request_s=10)
    rig = await make_rig(timeouts=timeouts)
    response = await rig.run("[[sim:fault stall after=3 seconds=5 times=1]] hi")
    _assert_completed(rig, response, attempts=2)
    assert [d.seq for d in rig.publisher.deltas_of("req-1", 1)] == [0, 1, 2]
    assert rig.sample("chat_worker_retries_total", reason="timeout") == 1


# --- refusals ------------------------------------------------------------------------------------


async def test_401_is_not_retried_and_marks_the_key_bad(make_rig: MakeRig) -> None:
    """A wrong API key fails at once with http_status 401, and the handler reports auth not ok."""
    rig = await make_rig(key="sk-wrong-0000")
    response = await rig.run("hi")
    _assert_failed(
        rig, response, code="vapi_auth_error", retryable=False, http_status=401, attempts=1
    )
    assert rig.calls("req-1") == [(1, 401)]
    assert rig.time.delays() == []
    assert rig.handler.auth_ok is False
    assert rig.sample("chat_worker_vapi_ready") == 0


async def test_auth_recovers_after_a_successful_call(make_rig: MakeRig) -> None:
    """After a 401, the next request that succeeds turns auth_ok (and vapi_ready) back on."""
    rig = await make_rig()
    refused = await rig.run("[[sim:fault status code=401 times=1]] hi", request_id="req-1")
    _assert_failed(
        rig, refused, code="vapi_auth_error", retryable=False, http_status=401, attempts=1
    )
    assert rig.handler.auth_ok is False
    _assert_completed(rig, await rig.run("hello", request_id="req-2"), attempts=1)
    assert rig.handler.auth_ok is True
    assert rig.sample("chat_worker_vapi_ready") == 1


async def test_unknown_previous_chat_id_is_retried_once_without_it(make_rig: MakeRig) -> None:
    """A 404 for a previousChatId Vapi no longer knows: one retry without it, context_reset true."""
    rig = await make_rig()
    response = await rig.run("What's my name?", state=ConversationState(chat_id="chat_gone"))
    _assert_completed(rig, response, attempts=2)
    assert response.context_reset is True
    assert response.previous_chat_id is None
    assert response.text == "I don't know your name yet."
    sent = [(c.previous_chat_id, c.status) for c in rig.sim.state.calls]
    assert sent == [("chat_gone", 404), (None, 200)]
    assert rig.time.delays() == [0.0]
    assert rig.sample("chat_worker_retries_total", reason="context_reset") == 1


async def test_chat_of_another_assistant_is_retried_once_without_it(make_rig: MakeRig) -> None:
    """A 400 for a previousChatId of another assistant also resets the context, once."""
    rig = await make_rig()
    first = await rig.run("My name is Ada.", request_id="req-1", assistant_id="asst-a")
    state = ConversationState(chat_id=first.chat_id)
    response = await rig.run("What's my name?", request_id="req-2", state=state, assistant_id="b")
    _assert_completed(rig, response, attempts=2)
    assert response.context_reset is True
    sent = [(c.previous_chat_id, c.status) for c in rig.sim.state.calls if c.request_id == "req-2"]
    assert sent == [(first.chat_id, 400), (None, 200)]


async def test_a_valid_previous_chat_id_is_kept(make_rig: MakeRig) -> None:
    """A known previousChatId continues the chat: no reset, the reply remembers turn 1."""
    rig = await make_rig()
    first = await rig.run("My name is Ada.", request_id="req-1")
    state = ConversationState(chat_id=first.chat_id)
    response = await rig.run("What's my name?", request_id="req-2", state=state)
    _assert_completed(rig, response, attempts=1)
    assert (response.context_reset, response.previous_chat_id) == (False, first.chat_id)
    assert response.text == "Your name is Ada."


# --- malformed events and giving up --------------------------------------------------------------


@pytest.mark.parametrize("line", ["json", "nodelta"])
async def test_malformed_sse_lines_are_skipped_and_counted(make_rig: MakeRig, line: str) -> None:
    """A malformed event is skipped and counted in malformed_events_total; the reply completes."""
    rig = await make_rig()
    response = await rig.run(f"[[sim:fault malformed after=2 line={line}]] hi")
    _assert_completed(rig, response, attempts=1)
    assert rig.sample("chat_worker_malformed_events_total") == 1


@pytest.mark.parametrize(
    ("directive", "code", "http_status"),
    [
        ("status code=503", "vapi_http_error", 503),
        ("disconnect after=2", "vapi_stream_broken", None),
        ("reset", "vapi_connect_error", None),
    ],
)
async def test_exhausted_retries_end_in_exactly_one_failed_response(
    make_rig: MakeRig, directive: str, code: str, http_status: int | None
) -> None:
    """A fault on every call uses up the attempts and ends in one failed, structured response."""
    rig = await make_rig()
    response = await rig.run(f"[[sim:fault {directive}]] hi")
    attempts = FAST_RETRIES.max_attempts
    _assert_failed(
        rig, response, code=code, retryable=True, http_status=http_status, attempts=attempts
    )
    assert [attempt for attempt, _ in rig.calls("req-1")] == list(range(1, attempts + 1))
    assert len(rig.time.delays()) == attempts - 1
    assert rig.sample("chat_worker_requests_total", outcome="completed") == 0


# --- answers and bugs nobody planned for --------------------------------------------------------


async def test_a_status_outside_http_ends_the_request_failed_without_retries(
    make_rig: MakeRig,
) -> None:
    """A status line of 999 (a broken proxy) is not Vapi's protocol: one failed response."""
    rig = await make_rig()
    response = await rig.run("[[sim:fault rawstatus code=999]] hi")
    _assert_failed(
        rig, response, code="vapi_protocol_error", retryable=False, http_status=None, attempts=1
    )
    assert response.error is not None
    assert "999" in response.error.message
    assert rig.calls("req-1") == [(1, 999)]
    assert rig.sample("chat_worker_internal_errors_total") == 0


class BuggyStreamer:
    """The real client, with a bug: its first stream raises ``KeyError`` after one delta."""

    def __init__(self, client: VapiClient) -> None:
        self._client = client
        self._calls = 0

    async def stream_chat(
        self, body: dict[str, object], *, request_id: str, attempt: int
    ) -> AsyncGenerator[StreamDelta, None]:
        self._calls += 1
        buggy = self._calls == 1
        async for delta in self._client.stream_chat(body, request_id=request_id, attempt=attempt):
            yield delta
            if buggy:
                raise KeyError("a bug in the request path")


async def test_a_bug_in_the_request_path_ends_that_request_with_internal_error(
    make_rig: MakeRig,
) -> None:
    """An exception nobody planned for is not retried: one failed response, counted, logged."""
    rig = await make_rig(wrap_client=BuggyStreamer)
    with capture_logs() as logs:
        response = await rig.run("hi")
    _assert_failed(
        rig, response, code="internal_error", retryable=False, http_status=None, attempts=1
    )
    assert response.error is not None
    assert "KeyError" in response.error.message
    assert rig.sample("chat_worker_internal_errors_total") == 1
    [logged] = [line for line in logs if line.get("exc_info")]
    assert logged["log_level"] == "error"
    assert isinstance(logged["exc_info"], KeyError)
    # The next request of the same handler runs as usual.
    _assert_completed(rig, await rig.run("hi again", request_id="req-2"), attempts=1)


class RefusingPublisher(RecordingPublisher):
    """Kafka refuses every delta: the loss of Kafka, which must reach the dispatcher."""

    async def send_delta(
        self, delta: ChatDelta, headers: Sequence[tuple[str, bytes]]
    ) -> Awaitable[object]:
        raise KafkaTimeoutError("no broker answered")


async def test_the_loss_of_kafka_is_not_mistaken_for_one_requests_trouble(
    make_rig: MakeRig,
) -> None:
    """A Kafka error publishing an output leaves the handler: no response, nothing counted."""
    rig = await make_rig(publisher=RefusingPublisher())
    with pytest.raises(KafkaTimeoutError):
        await rig.run("hi")
    assert rig.publisher.responses == []
    assert rig.sample("chat_worker_internal_errors_total") == 0


# --- delta coalescing ----------------------------------------------------------------------------


@pytest.mark.parametrize(("chars", "ms"), [(40, 0), (0, 30), (25, 30)])
async def test_coalesced_deltas_are_fewer_gap_free_and_make_up_the_reply(
    make_rig: MakeRig, chars: int, ms: int
) -> None:
    """With coalescing on, fewer deltas than tokens arrive, seq has no gaps, the text is whole."""
    rig = await make_rig(coalesce_chars=chars, coalesce_ms=ms)
    response = await rig.run("[[sim:pace tokens=60 delay_ms=2 first_ms=0]] tell me a story")
    _assert_completed(rig, response, attempts=1)
    deltas = rig.publisher.deltas_of("req-1", 1)
    assert [d.seq for d in deltas] == list(range(len(deltas)))
    assert "".join(d.delta for d in deltas) == response.text == rig.reply_of(response)
    assert 1 <= len(deltas) < 60
    assert response.delta_count == len(deltas)
    if chars and not ms:
        assert all(len(d.delta) >= chars for d in deltas[:-1])


# --- size limits ---------------------------------------------------------------------------------


@pytest.mark.parametrize("coalesce_chars", [0, 500])
async def test_a_reply_over_max_reply_chars_fails_and_holds_no_more_than_the_limit(
    make_rig: MakeRig, coalesce_chars: int
) -> None:
    """The event that takes the reply past MAX_REPLY_CHARS ends the request.

    Nothing of it or after it is published or kept, Vapi is not called again, and the failure
    says why.
    """
    rig = await make_rig(max_reply_chars=1000, coalesce_chars=coalesce_chars)
    response = await rig.run("[[sim:pace tokens=10 token_chars=300]] go")
    _assert_failed(
        rig, response, code="reply_too_large", retryable=False, http_status=None, attempts=1
    )
    assert "1000" in response.error.message if response.error else False
    deltas = rig.publisher.deltas_of("req-1", 1)
    assert [d.seq for d in deltas] == list(range(len(deltas)))
    streamed = "".join(d.delta for d in deltas)
    within_limit = ("x" * 299 + " ") * 3
    # Coalesced text still held when the limit is passed is dropped, never published.
    assert streamed == within_limit if not coalesce_chars else within_limit.startswith(streamed)
    assert rig.calls("req-1") == [(1, 200)]
    assert rig.sample("chat_worker_vapi_responses_total", status="200") == 1


async def test_a_reply_of_exactly_max_reply_chars_completes(make_rig: MakeRig) -> None:
    """The limit is inclusive."""
    rig = await make_rig(max_reply_chars=900)
    response = await rig.run("[[sim:pace tokens=3 token_chars=300]] go")
    _assert_completed(rig, response, attempts=1)
    assert len(response.text) == 900


async def test_a_short_stream_is_completed_with_vapis_text_and_its_cost(make_rig: MakeRig) -> None:
    """A stream that ends cleanly half-way: the response carries the chat's whole reply."""
    rig = await make_rig(fetch_chat=True)
    response = await rig.run("[[sim:fault truncate after=2]] go")
    assert response.status == "completed", response.error
    assert response.stream_complete is False
    assert response.text == rig.reply_of(response)
    assert "".join(d.delta for d in rig.publisher.deltas_of("req-1", 1)) == "Reply to: "
    assert response.delta_count == 2
    assert response.cost is not None
    assert response.cost.usd > 0
    assert rig.calls("req-1") == [(1, 200)], "the reply is not asked for again"


async def test_vapis_text_over_max_reply_chars_fails_with_reply_too_large(
    make_rig: MakeRig,
) -> None:
    """The limit holds for Vapi's text too: a truncated stream whose chat is too long fails."""
    rig = await make_rig(fetch_chat=True, max_reply_chars=1000)
    response = await rig.run("[[sim:pace tokens=5 token_chars=300]] [[sim:fault truncate after=2]]")
    assert response.status == "failed"
    assert response.error is not None
    assert response.error.code == "reply_too_large"
    assert response.chat_id is None, "the conversation stays on its last turn that fitted"


async def test_a_huge_event_is_split_into_deltas_within_the_bound(make_rig: MakeRig) -> None:
    """One event of 40,000 control characters (240 kB as JSON) becomes several deltas.

    Each is within MAX_DELTA_TEXT_BYTES; seq is gap-free; they join to the reply.
    """
    rig = await make_rig()
    response = await rig.run("[[sim:pace tokens=1 token_chars=40000 char=\x01]] go")
    _assert_completed(rig, response, attempts=1)
    deltas = rig.publisher.deltas_of("req-1", 1)
    assert len(deltas) > 1
    assert all(json_text_bytes(d.delta) <= MAX_DELTA_TEXT_BYTES for d in deltas)
    assert response.text == "\x01" * 39_999 + " "


async def test_a_response_over_the_record_limit_fails_with_reply_too_large(
    make_rig: MakeRig,
) -> None:
    """A reply within MAX_REPLY_CHARS whose response record is still too large fails.

    Control characters take 6 bytes each as JSON; the conversation does not move to the chat.
    """
    rig = await make_rig(max_reply_chars=100_000, max_record_bytes=200_000)
    request = ChatRequest.model_validate(
        {
            "request_id": "req-1",
            "conversation_id": CONVERSATION,
            "input": "[[sim:pace tokens=4 token_chars=10000 char=\x01]] go",
        }
    )
    response = await rig.run_request(request)
    _assert_failed(
        rig, response, code="reply_too_large", retryable=False, http_status=None, attempts=1
    )
    state = rig.store.get(CONVERSATION)
    assert (state.chat_id, state.session_id) == (None, None)
    assert len(rig.publisher.deltas_of("req-1", 1)) >= 4
