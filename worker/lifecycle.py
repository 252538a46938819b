"""One request's life, in one place (docs/design.md §4): from the record's bytes to its new state.

The dispatcher (``worker.dispatcher``) decides *when* a record runs and acks it once this module
says it is finished. What running it means is decided here, in order:

1. ``read``: the record is decoded once: a request, or a dead letter with its reason.
2. ``run``: a dead letter is published. A request that finished before (§5.5) is skipped. A
   request too old to start (``expires_at``, ``WORKER_REQUEST_MAX_AGE_S``) or whose conversation
   spent its budget (``WORKER_CONVERSATION_BUDGET_USD``) gets its ``expired`` or ``failed``
   response and no Vapi call; nothing of its conversation's state changes. Otherwise
   ``RequestHandler.handle`` streams it from Vapi, publishing its deltas, to an ``Outcome``: a
   ``completed`` or ``failed`` response and the chat id to remember.
3. The final step: the final response is published (its broker ack awaited), then the
   conversation's new state is written (its changelog ack awaited). It runs in a task of its own
   that the request awaits through ``asyncio.shield``, as arq's worker shields ``finish_job``:
   cancelling the request (a release past its grace period, §9) cannot stop the step half-way.
   ``settle`` then waits for the steps still under way, up to the finish bound, and cuts the rest
   off.

Every request's end is counted here, once (``chat_worker_requests_total``). Only the loss of
Kafka stops the worker (``worker.failures``): the record is not acked, and ``run`` returns False.
Any other failure ends its one request: a ``failed`` response (``internal_error``) unless its
final response is already out, and the record is finished.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Protocol

import structlog

from worker.budget import budget_exceeded
from worker.config import Settings
from worker.errors import BudgetExceededError, InvalidRequestError, RequestExpiredError
from worker.failures import stops_the_worker
from worker.messages import (
    ChatRequest,
    ChatResponse,
    Headers,
    RecordHeaders,
    decode_request,
    output_headers,
)
from worker.metrics import WorkerMetrics
from worker.pipeline import Outcome, RequestHandler
from worker.request_age import request_expiry
from worker.state import ConversationState, SourcePosition

log = structlog.get_logger(__name__)


class PartitionId(Protocol):
    """A topic partition (``faust.types.TP``, ``aiokafka.structs.TopicPartition``)."""

    def __hash__(self) -> int: ...
    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...


class Message(Protocol):
    """A Kafka record as Faust hands it over (``faust.types.Message``)."""

    @property
    def tp(self) -> PartitionId: ...
    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> RecordHeaders | None: ...
    @property
    def timestamp(self) -> float | None: ...


class Event(Protocol):
    """A Faust event: the record it carries (``faust.types.EventT``)."""

    @property
    def message(self) -> Message: ...


class StateStore(Protocol):
    """The conversations' state (``worker.state.ConversationStore``)."""

    def get(self, conversation_id: str) -> ConversationState: ...

    async def put(self, conversation_id: str, state: ConversationState, partition: int) -> None:
        """Write the state to the changelog ``partition``; returns once the broker has it."""
        ...


class FinalOutputs(Protocol):
    """Where final responses and dead letters go (``worker.kafka_adapters.KafkaPublisher``)."""

    async def send_response(self, response: ChatResponse, headers: Headers) -> None:
        """Publish the final response and wait for the broker's ack."""
        ...

    async def send_dead_letter(self, event: Event, error: InvalidRequestError) -> None:
        """Publish the record to the dead-letter topic and wait for the broker's ack."""
        ...


@dataclass(eq=False, slots=True)
class Record:
    """One taken record, read once: a request, or the reason it is a dead letter."""

    event: Event
    queued_at: float
    request: ChatRequest | None
    invalid: InvalidRequestError | None
    trace_headers: RecordHeaders = ()

    @property
    def message(self) -> Message:
        return self.event.message

    @property
    def conversation_id(self) -> str | None:
        """The ordering key: the request's conversation; None for a dead letter."""
        return None if self.request is None else self.request.conversation_id


def source_position(message: Message) -> SourcePosition | None:
    """Where a request record sits in its topic; None for a record without a timestamp."""
    if message.timestamp is None or message.timestamp < 0:
        return None
    return SourcePosition(message.partition, message.offset, round(message.timestamp * 1000))


class RequestLifecycle:
    """Runs taken records to their end (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        handler: RequestHandler,
        store: StateStore,
        outputs: FinalOutputs,
        metrics: WorkerMetrics,
        on_crash: Callable[[BaseException], Awaitable[None]],
    ) -> None:
        self._settings = settings
        self._handler = handler
        self._store = store
        self._outputs = outputs
        self._metrics = metrics
        self._on_crash = on_crash
        #: Final steps whose request has not taken their result yet, with their record.
        self._final_steps: dict[asyncio.Task[bool], Record] = {}

    def read(self, event: Event) -> Record:
        """Decode the record once: its request, or why it is a dead letter."""
        message = event.message
        headers = list(message.headers or ())
        try:
            request = decode_request(
                message.value,
                message.key,
                headers,
                max_input_chars=self._settings.max_input_chars,
                max_metadata_bytes=self._settings.max_metadata_bytes,
            )
            self._check_assistant(request)
        except InvalidRequestError as err:
            return Record(event, time.monotonic(), None, err)
        return Record(event, time.monotonic(), request, None, headers)

    def _check_assistant(self, request: ChatRequest) -> None:
        allowlist = self._settings.vapi_assistant_allowlist
        if request.assistant_id is not None and allowlist and request.assistant_id not in allowlist:
            raise InvalidRequestError(
                "assistant_not_allowed",
                detail=f"assistant_id {request.assistant_id[:80]!r} is not in the allowlist",
            )

    async def run(self, record: Record) -> bool:
        """Run the record to its end; True when it is finished (ack it), False when the worker
        stops (leave it unacked)."""
        structlog.contextvars.clear_contextvars()
        request = record.request
        if request is None:
            return await self._dead_letter(record)
        structlog.contextvars.bind_contextvars(
            request_id=request.request_id, conversation_id=request.conversation_id
        )
        try:
            state = self._store.get(request.conversation_id)
            if state.has_finished(request.request_id, source_position(record.message)):
                self._count("duplicate")
                log.info("duplicate request skipped", offset=record.message.offset)
                return True
            refusal = self._refusal(record, request, state)
            if refusal is not None:
                refused = self._handler.refuse(request, refusal, queued_at=record.queued_at)
                self._count(refused.response.status)
                return await self._shielded(
                    record, self._final_step(record, request, refused, state, remember=False)
                )
            self._metrics.in_flight.inc()
            try:
                outcome = await self._handler.handle(
                    request, state, queued_at=record.queued_at, trace_headers=record.trace_headers
                )
            finally:
                self._metrics.in_flight.dec()
        except Exception as exc:
            if stops_the_worker(exc):
                return await self._stop(exc)
            outcome = self._handler.internal_failure(
                request, exc, queued_at=record.queued_at, handled=False
            )
            self._count(outcome.response.status)
            return await self._shielded(
                record, self._final_step(record, request, outcome, None, last=True)
            )
        self._count(outcome.response.status)
        return await self._shielded(record, self._final_step(record, request, outcome, state))

    def _refusal(
        self, record: Record, request: ChatRequest, state: ConversationState
    ) -> RequestExpiredError | BudgetExceededError | None:
        """Why the request may not call Vapi: too old to start, or its conversation over budget."""
        return request_expiry(
            now_s=time.time(),
            expires_at=request.expires_at,
            record_timestamp_s=record.message.timestamp,
            max_age_s=self._settings.worker_request_max_age_s,
        ) or budget_exceeded(state.spent_usd, self._settings.worker_conversation_budget_usd)

    def _count(self, outcome: str) -> None:
        """Count a request's end: ``completed``, ``failed``, ``expired``, ``duplicate`` or
        ``invalid``."""
        self._metrics.requests_total.labels(outcome=outcome).inc()

    async def _shielded(self, record: Record, step: Coroutine[object, None, bool]) -> bool:
        """Run the final step in a task of its own that cancelling the request does not stop."""
        task = asyncio.ensure_future(step)
        self._final_steps[task] = record
        done = await asyncio.shield(task)  # cancelled: the step goes on, ``settle`` takes it
        del self._final_steps[task]
        return done

    async def _final_step(
        self,
        record: Record,
        request: ChatRequest,
        outcome: Outcome,
        state: ConversationState | None,
        *,
        last: bool = False,
        remember: bool = True,
    ) -> bool:
        """Publish the final response, then remember the request as finished.

        ``last``: the outcome already stands for a failure; if this fails too, nothing more is
        tried. ``remember=False``: a refused request (not run) leaves the state as it was; a
        redelivered copy is judged again, and refused again.
        """
        published = False
        try:
            await self._publish(record, outcome.response)
            published = True
            if remember:
                await self._remember(record, request, outcome, state)
            return True
        except Exception as exc:
            if stops_the_worker(exc):
                return await self._stop(exc)
            if last:
                log.error("the failed response could not be published either", exc_info=exc)
                return True
            if published:
                log.error("request ended by an internal error", exc_info=exc)
                self._metrics.internal_errors_total.inc()
                return True
            failed = self._handler.internal_failure(
                request, exc, queued_at=record.queued_at, handled=True
            )
        return await self._final_step(record, request, failed, None, last=True)

    async def _publish(self, record: Record, response: ChatResponse) -> None:
        headers = output_headers(ChatResponse.SCHEMA, record.trace_headers)
        await self._outputs.send_response(response, headers)

    async def _remember(
        self,
        record: Record,
        request: ChatRequest,
        outcome: Outcome,
        state: ConversationState | None,
    ) -> None:
        """Write the conversation's new state to the request's own changelog partition."""
        if state is None:
            state = self._store.get(request.conversation_id)
        message = record.message
        new_state = state.after_request(
            request.request_id,
            outcome.chat_id,
            outcome.session_id,
            keep=self._settings.worker_completed_ids_kept,
            source=source_position(message),
            active_ms=round(time.time() * 1000),
            cost_usd=outcome.response.cost.usd if outcome.response.cost is not None else 0.0,
        )
        await self._store.put(request.conversation_id, new_state, message.partition)

    async def _dead_letter(self, record: Record) -> bool:
        assert record.invalid is not None
        message = record.message
        try:
            await self._outputs.send_dead_letter(record.event, record.invalid)
        except Exception as exc:
            if stops_the_worker(exc):
                return await self._stop(exc)
            log.error("request ended by an internal error", exc_info=exc)
            self._metrics.internal_errors_total.inc()
            return True
        self._count("invalid")
        self._metrics.count_dead_letter(record.invalid.reason)
        log.warning(
            "record sent to the dead-letter topic",
            reason=record.invalid.reason,
            detail=record.invalid.detail,
            partition=message.partition,
            offset=message.offset,
        )
        return True

    async def _stop(self, exc: Exception) -> bool:
        """Kafka refused an output: the record stays unacked, the worker stops (§8)."""
        log.error("Kafka refused an output: the worker stops", exc_info=exc)
        await self._on_crash(exc)
        return False

    async def settle(self, until: float) -> tuple[list[Record], list[Record]]:
        """After their requests were cancelled: wait for the final steps under way, at most until
        ``until`` (``time.monotonic``), then cut the rest off.

        Returns the records whose final step finished them (to ack) and those cut off.
        """
        steps = list(self._final_steps)
        remaining = until - time.monotonic()
        if steps and remaining > 0:
            await asyncio.wait(steps, timeout=remaining)
        finished: list[Record] = []
        cut: list[Record] = []
        for step in steps:
            record = self._final_steps.pop(step)
            if not step.done():
                step.cancel()
                cut.append(record)
            elif not step.cancelled() and step.exception() is None and step.result():
                finished.append(record)
        await asyncio.gather(*steps, return_exceptions=True)
        return finished, cut
