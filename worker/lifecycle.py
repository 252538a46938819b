"""One request's life, in one place (docs/design.md §4): from the record's bytes to its new state.

The dispatcher (``worker.dispatcher``) decides *when* a record runs and acks it once this module
says it is finished. What running it means is decided here, in order:

1. ``read``: the record is decoded once: a request, a cancel, or a dead letter with its reason.
   A cancel (or a request with ``supersede``) is applied by the dispatcher when it takes the
   record (``cancel``, §5.8): a targeted request not started yet ends ``cancelled`` when its turn
   comes, without a Vapi call; one streaming from Vapi has its task cancelled, which closes its
   HTTP stream, and ends ``cancelled`` with the text streamed so far. One in its final step, or
   finished, is not affected.
2. ``run``: a dead letter is published; a cancel has nothing left to do. A request that finished
   before (§5.5) is skipped; one cancelled before it started ends ``cancelled``. A request too
   old to start (``expires_at``, ``WORKER_REQUEST_MAX_AGE_S``) or whose conversation
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
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

import structlog

from worker.budget import budget_exceeded
from worker.cancellation import Cancellation, cancellation_by, targets
from worker.config import Settings
from worker.errors import BudgetExceededError, InvalidRequestError, RequestExpiredError
from worker.failures import stops_the_worker
from worker.messages import (
    ChatCancel,
    ChatRequest,
    ChatResponse,
    Headers,
    RecordHeaders,
    decode_record,
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


#: Where a request is in its run, as a cancel sees it: not begun (a cancel ends it before any
#: call), streaming from Vapi (a cancel cancels its task), or past both (a cancel is too late).
Phase = Literal["waiting", "handling", "ended"]


@dataclass(eq=False, slots=True)
class Record:
    """One taken record, read once: a request, a cancel, or the reason it is a dead letter."""

    event: Event
    queued_at: float
    request: ChatRequest | None
    invalid: InvalidRequestError | None
    trace_headers: RecordHeaders = ()
    cancel: ChatCancel | None = None
    #: Set by a cancel or a superseding request taken after this one.
    cancellation: Cancellation | None = None
    phase: Phase = "waiting"
    #: The task running the request, while it is ``handling``.
    task: asyncio.Task[object] | None = None

    @property
    def message(self) -> Message:
        return self.event.message

    @property
    def conversation_id(self) -> str | None:
        """The ordering key: the request's conversation; None for a cancel (it runs at once: its
        effect was applied when it was taken) and for a dead letter."""
        return None if self.request is None else self.request.conversation_id

    @property
    def cancels_others(self) -> bool:
        """True for a cancel and for a request with ``supersede``: the dispatcher applies it to
        the records taken before it."""
        return self.cancel is not None or (self.request is not None and self.request.supersede)


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
            decoded = decode_record(
                message.value,
                message.key,
                headers,
                max_input_chars=self._settings.max_input_chars,
                max_metadata_bytes=self._settings.max_metadata_bytes,
            )
            if isinstance(decoded, ChatCancel):
                return Record(event, time.monotonic(), None, None, headers, cancel=decoded)
            self._check_assistant(decoded)
        except InvalidRequestError as err:
            return Record(event, time.monotonic(), None, err)
        return Record(event, time.monotonic(), decoded, None, headers)

    def cancel(self, by: Record, earlier: Iterable[Record]) -> list[str]:
        """Apply ``by`` (a cancel, or a request with ``supersede``) to the records of its
        partition taken before it; returns the request ids it cancelled.

        A targeted request not begun is marked: it ends ``cancelled`` when it runs. One streaming
        is marked and its task cancelled: its HTTP stream closes now (§5.8). One past that is
        finished or finishing: too late, untouched.
        """
        cancelling = by.cancel if by.cancel is not None else by.request
        assert cancelling is not None
        message = by.message
        cancellation = cancellation_by(
            cancelling, partition=message.partition, offset=message.offset, read_at=by.queued_at
        )
        cancelled: list[str] = []
        for record in earlier:
            request = record.request
            if request is None or record.phase == "ended" or record.cancellation is not None:
                continue
            if not targets(cancelling, request):
                continue
            record.cancellation = cancellation
            if record.phase == "handling" and record.task is not None:
                record.task.cancel()
            cancelled.append(request.request_id)
        if by.cancel is not None:
            self._metrics.cancels_total.labels(effect="cancelled" if cancelled else "none").inc()
            log.info(
                "cancel taken",
                conversation_id=cancelling.conversation_id,
                request_id=by.cancel.request_id,
                cancelled=cancelled,
                partition=message.partition,
                offset=message.offset,
            )
        elif cancelled:
            log.info(
                "requests superseded",
                conversation_id=cancelling.conversation_id,
                by_request_id=by.request.request_id if by.request else None,
                cancelled=cancelled,
            )
        return cancelled

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
        # From here a cancel reaches the request only while it streams (``handling``).
        cancellation, record.phase = record.cancellation, "ended"
        if record.cancel is not None:
            return True  # applied when it was taken
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
            if cancellation is not None:
                # Remembered as finished (its response is out), the conversation's chat id kept.
                cancelled = self._handler.cancelled_before_start(
                    request, cancellation, queued_at=record.queued_at
                )
                self._count("cancelled")
                return await self._shielded(
                    record, self._final_step(record, request, cancelled, state)
                )
            refusal = self._refusal(record, request, state)
            if refusal is not None:
                refused = self._handler.refuse(request, refusal, queued_at=record.queued_at)
                self._count(refused.response.status)
                return await self._shielded(
                    record, self._final_step(record, request, refused, state, remember=False)
                )
            self._metrics.in_flight.inc()
            record.phase, record.task = "handling", asyncio.current_task()
            try:
                outcome = await self._handler.handle(
                    request,
                    state,
                    queued_at=record.queued_at,
                    trace_headers=record.trace_headers,
                    cancelled=lambda: record.cancellation,
                )
            finally:
                record.phase, record.task = "ended", None
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
        """Count a request's end: ``completed``, ``failed``, ``expired``, ``cancelled``,
        ``duplicate`` or ``invalid``."""
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
