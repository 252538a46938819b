"""Handle one chat request: call Vapi, publish every delta in order, publish one final response.

The handler knows nothing of Faust or httpx: its collaborators (the Vapi stream, the publisher,
the retry policy, the clocks, the metrics) are passed in, so tests can hand it the real simulator
client and a real Kafka publisher, or fakes. ``worker.lifecycle`` runs a request from its record to
its new state (duplicates, the final step); this module is its Vapi part: the attempts, their
deltas and the outcome (docs/design.md §4.3 and §6).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import structlog

from worker.acks import DeltaAcks
from worker.cancellation import Cancellation
from worker.coalescing import DeltaCoalescer
from worker.errors import (
    BudgetExceededError,
    InternalError,
    ReplyTooLargeError,
    RequestExpiredError,
    VapiAuthError,
    VapiError,
    VapiRateLimitedError,
    VapiStatusError,
    WorkerError,
)
from worker.failures import stops_the_worker
from worker.limits import MAX_DELTA_TEXT_BYTES, SAFE_DELTA_CHARS, record_bytes, split_text
from worker.messages import (
    ChatDelta,
    ChatRequest,
    ChatResponse,
    Cost,
    ErrorInfo,
    Headers,
    RecordHeaders,
    Timings,
    output_headers,
)
from worker.metrics import WorkerMetrics
from worker.reply_check import UNCHECKED, ReplyCheck, ReplyChecker
from worker.retry import RetryPolicy, SharedBackoff
from worker.state import ConversationState
from worker.vapi.events import StreamDelta

log = structlog.get_logger(__name__)

#: Deltas added to ``chat_worker_deltas_total`` at once (and at the end of every attempt): the
#: counter takes a lock per call, once per delta was a few percent of the worker's CPU.
DELTA_COUNT_BATCH = 32


class ChatStreamer(Protocol):
    """What the handler needs of a Vapi client (``worker.vapi.client.VapiClient``)."""

    def stream_chat(
        self, body: dict[str, object], *, request_id: str, attempt: int
    ) -> AsyncGenerator[StreamDelta, None]: ...


class OutputPublisher(Protocol):
    """Where deltas go (``worker.kafka_adapters.KafkaPublisher``), with the record headers given."""

    async def send_delta(self, delta: ChatDelta, headers: Headers) -> Awaitable[object]:
        """Hand the delta to the producer; the returned awaitable resolves on the broker's ack."""
        ...


@dataclass(frozen=True, slots=True)
class HandlerSettings:
    """The part of ``Settings`` the handler reads."""

    default_assistant_id: str
    context_mode: str = "previous_chat_id"
    request_deadline_s: float = 300.0
    coalesce_ms: int = 0
    coalesce_chars: int = 0
    #: Longest reply; the event that goes past it fails the request (``reply_too_large``).
    max_reply_chars: int = 100_000
    #: Largest record the producer may send (its ``max_request_size``).
    max_record_bytes: int = 1_000_000


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one request ended with; its lifecycle stores ``chat_id`` and ``session_id``."""

    response: ChatResponse
    chat_id: str | None
    session_id: str | None


@dataclass(slots=True)
class _Run:
    """Mutable bookkeeping of one request across its attempts."""

    request: ChatRequest
    started: float
    queued_ms: float
    previous_chat_id: str | None
    session_id: str | None
    context_reset: bool
    attempts: int = 0
    delta_count: int = 0
    first_delta_at: float | None = None
    stale_context_retried: bool = False
    #: The attempt under way, or the last one: what a cancelled request ends with.
    current: _Attempt | None = None


@dataclass(slots=True)
class _Attempt:
    """What one attempt produced."""

    acks: DeltaAcks
    chat_id: str | None = None
    session_id: str | None = None
    parts: list[str] = field(default_factory=list)
    #: Characters of reply text received so far; bounded by ``max_reply_chars``.
    chars: int = 0
    seq: int = 0
    #: Deltas published but not yet added to ``chat_worker_deltas_total``.
    uncounted: int = 0


class RequestHandler:
    """Runs requests against Vapi and publishes their outputs."""

    def __init__(
        self,
        client: ChatStreamer,
        publisher: OutputPublisher,
        policy: RetryPolicy,
        backoff: SharedBackoff,
        metrics: WorkerMetrics,
        settings: HandlerSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        reply_checker: ReplyChecker | None = None,
    ) -> None:
        self._client = client
        #: Fetches each finished stream's chat (cost, completeness); None: ``VAPI_FETCH_CHAT`` off.
        self._reply_checker = reply_checker
        self._publisher = publisher
        self._policy = policy
        self._backoff = backoff
        self._metrics = metrics
        self._settings = settings
        self._clock = clock
        self._wall = wall_clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        #: False after Vapi refused the key (401/403), until a call succeeds again: /healthz and
        #: /readyz report it under dependencies and chat_worker_vapi_ready is 0; no retry storm.
        self.auth_ok = True

    async def handle(
        self,
        request: ChatRequest,
        state: ConversationState,
        *,
        queued_at: float,
        trace_headers: RecordHeaders = (),
        cancelled: Callable[[], Cancellation | None] = lambda: None,
    ) -> Outcome:
        """Run ``request`` to its final response (completed or failed), deltas published.

        The response itself is published by the request's final step (``worker.lifecycle``),
        which cancellation cannot stop half-way. A task cancellation while ``cancelled()`` says
        why (a cancel, a superseding request: §5.8) ends the request ``cancelled``: its HTTP
        stream is closed, and the deltas it published stay; any other cancellation (a release)
        propagates.
        """
        now = self._clock()
        previous = None if request.reset_context else state.chat_id
        run = _Run(
            request=request,
            started=now,
            queued_ms=max(0.0, (now - queued_at) * 1000),
            previous_chat_id=previous,
            session_id=None if request.reset_context else state.session_id,
            context_reset=request.reset_context and state.chat_id is not None,
        )
        self._metrics.queue_wait_seconds.observe(now - queued_at)
        try:
            # The same headers go on every delta of the request: built once, not per delta.
            outcome = await self._run_attempts(run, output_headers(ChatDelta.SCHEMA, trace_headers))
        except asyncio.CancelledError:
            cancellation = cancelled()
            if cancellation is None:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            outcome = await self._cancelled_while_running(run, cancellation)
        except Exception as exc:
            if stops_the_worker(exc):
                raise
            outcome = self._internal_failure(run, exc)
        outcome = self._fitted(run, outcome, trace_headers)
        self._record_outcome(run, outcome.response)
        return outcome

    def _fitted(self, run: _Run, outcome: Outcome, trace_headers: RecordHeaders) -> Outcome:
        """The outcome, or ``reply_too_large`` if its completed response would not fit a record.

        At the defaults ``max_reply_chars`` alone keeps a response within a record; this check
        keeps it there for any setting, any characters (up to 6 bytes each as JSON) and any
        echoed metadata. Once per request: one more encoding of the response.
        """
        response = outcome.response
        if response.status != "completed":
            return outcome
        size = record_bytes(
            response.conversation_id.encode(),
            response.encode(),
            output_headers(ChatResponse.SCHEMA, trace_headers),
        )
        limit = self._settings.max_record_bytes
        if size <= limit:
            return outcome
        err = ReplyTooLargeError(
            f"the response would be a {size}-byte record; the producer sends at most {limit}"
        )
        log.warning("request failed", error=err.code, message=str(err))
        return self._failed(run, err)

    def _unstarted_run(self, request: ChatRequest, queued_at: float) -> _Run:
        """The run of a request that ends before any Vapi call: no chat, no context."""
        now = self._clock()
        return _Run(
            request=request,
            started=now,
            queued_ms=max(0.0, (now - queued_at) * 1000),
            previous_chat_id=None,
            session_id=None,
            context_reset=False,
        )

    def internal_failure(
        self, request: ChatRequest, exc: Exception, *, queued_at: float, handled: bool
    ) -> Outcome:
        """The ``failed`` outcome of a request that ``exc`` ended outside ``handle``.

        ``handled``: ``handle`` returned before ``exc`` (publishing failed), so the request's
        duration and ``request finished`` line are already written; they are not written twice.
        """
        run = self._unstarted_run(request, queued_at)
        outcome = self._internal_failure(run, exc)
        if not handled:
            self._record_outcome(run, outcome.response)
        return outcome

    def refuse(
        self,
        request: ChatRequest,
        err: RequestExpiredError | BudgetExceededError,
        *,
        queued_at: float,
    ) -> Outcome:
        """The outcome of a request refused before any call: ``expired`` (too old to start,
        ``worker.request_age``) or ``failed`` with ``budget_exceeded`` (``worker.budget``).

        No Vapi call is made, and the outcome carries no chat id: the conversation's state is
        not changed by it.
        """
        run = self._unstarted_run(request, queued_at)
        log.info("request refused before any call", error=err.code, message=str(err))
        status: Literal["failed", "expired"] = (
            "expired" if isinstance(err, RequestExpiredError) else "failed"
        )
        outcome = self._failed(run, err, status=status)
        self._record_outcome(run, outcome.response)
        return outcome

    def cancelled_before_start(
        self, request: ChatRequest, cancellation: Cancellation, *, queued_at: float
    ) -> Outcome:
        """The ``cancelled`` outcome of a request cancelled before it started: no Vapi call, no
        chat id (the conversation's state keeps its chat)."""
        run = self._unstarted_run(request, queued_at)
        log.info("request cancelled before it started", error=cancellation.code)
        outcome = Outcome(self._cancelled_response(run, cancellation), None, None)
        self._record_outcome(run, outcome.response)
        return outcome

    async def _cancelled_while_running(self, run: _Run, cancellation: Cancellation) -> Outcome:
        """The ``cancelled`` outcome of a request whose task was cancelled while it ran: its
        HTTP stream is closed by now (``aclosing``).

        The response carries the text the deltas published and the cut-off chat's id, once those
        deltas are on the broker. The outcome carries no chat id: the conversation's next turn
        continues from the chat before this one, as if this turn had not been asked.
        """
        closed_s = self._clock() - cancellation.read_at
        self._metrics.cancel_seconds.observe(closed_s)
        log.info(
            "request cancelled while running",
            error=cancellation.code,
            cancel_to_closed_ms=round(closed_s * 1000, 3),
            deltas=run.delta_count,
        )
        if run.current is not None:
            await run.current.acks.wait()
        outcome = Outcome(self._cancelled_response(run, cancellation), None, None)
        self._record_outcome(run, outcome.response)
        return outcome

    def _cancelled_response(self, run: _Run, cancellation: Cancellation) -> ChatResponse:
        request, attempt = run.request, run.current
        return ChatResponse(
            request_id=request.request_id,
            conversation_id=request.conversation_id,
            chat_id=None if attempt is None else attempt.chat_id or None,
            previous_chat_id=run.previous_chat_id,
            status="cancelled",
            text="" if attempt is None else "".join(attempt.parts),
            delta_count=0 if attempt is None else attempt.seq,
            attempts=run.attempts,
            context_reset=run.context_reset,
            error=ErrorInfo(
                code=cancellation.code,
                message=cancellation.message,
                retryable=False,
                http_status=None,
            ),
            timings=self._timings(run),
            metadata=request.metadata,
        )

    def _internal_failure(self, run: _Run, exc: Exception) -> Outcome:
        """End the request on an exception nobody planned for: logged with its traceback, counted.

        The response names the exception's type only: its text may carry anything.
        """
        log.error("request ended by an internal error", exc_info=exc)
        self._metrics.internal_errors_total.inc()
        error = InternalError(
            f"the worker failed on this request ({type(exc).__name__}); its log has the details"
        )
        return self._failed(run, error)

    async def _run_attempts(self, run: _Run, headers: Headers) -> Outcome:
        deadline = run.started + self._settings.request_deadline_s
        while True:
            paused = await self._wait_for_shared_backoff(deadline)
            if paused is not None:
                return self._failed(run, paused)
            run.attempts += 1
            structlog.contextvars.bind_contextvars(attempt=run.attempts)
            try:
                attempt = await self._stream_once(run, headers)
            except ReplyTooLargeError as err:
                # Vapi answered; the answer is the problem. Asking again would cost as much.
                self._metrics.vapi_responses_total.labels(status="200").inc()
                self._set_auth(ok=True)
                log.warning("request failed", error=err.code, message=str(err))
                return self._failed(run, err)
            except VapiError as err:
                self._metrics.vapi_responses_total.labels(
                    status=str(err.http_status or "error")
                ).inc()
                if isinstance(err, VapiAuthError):
                    self._set_auth(ok=False)
                delay = self._retry_delay(run, err)
                if delay is None or self._clock() + delay > deadline:
                    log.warning("request failed", error=err.code, message=str(err))
                    return self._failed(run, err)
                log.info("retrying", error=err.code, delay_s=round(delay, 3))
                await self._sleep(delay)
                continue
            self._metrics.vapi_responses_total.labels(status="200").inc()
            self._set_auth(ok=True)
            check = await self._check_reply(run, attempt, deadline)
            return self._completed(run, attempt, check)

    async def _check_reply(self, run: _Run, attempt: _Attempt, deadline: float) -> ReplyCheck:
        """The chat's cost, and whether the stream was all of it (``worker.reply_check``)."""
        if self._reply_checker is None or attempt.chat_id is None:
            return UNCHECKED
        return await self._reply_checker.check(
            attempt.chat_id,
            "".join(attempt.parts),
            request_id=run.request.request_id,
            deadline=deadline,
        )

    def _set_auth(self, *, ok: bool) -> None:
        if ok != self.auth_ok:
            self.auth_ok = ok
            self._metrics.vapi_ready.set(1 if ok else 0)
            if not ok:
                log.error("Vapi refused the API key; requests fail until it is fixed")

    def _retry_delay(self, run: _Run, err: VapiError) -> float | None:
        """Seconds to wait before the next attempt, or None to give up."""
        if self._is_stale_context(run, err):
            # The chat (or session) the conversation pointed at is gone on Vapi's side: go on
            # without it, once, and say so in the response.
            run.stale_context_retried = True
            run.previous_chat_id = None
            run.session_id = None
            run.context_reset = True
            self._metrics.retries_total.labels(reason="context_reset").inc()
            return 0.0
        pause = self._policy.rate_limit_pause(err)
        if pause:
            self._pause_everyone(pause, err)
        delay = self._policy.delay_for(run.attempts, err, self._rng)
        if delay is not None:
            self._metrics.retries_total.labels(reason=_retry_reason(err)).inc()
        return delay

    def _pause_everyone(self, pause: float, err: VapiError) -> None:
        """Hold every call of this worker for ``pause`` seconds (a 429's Retry-After, capped)."""
        now = self._clock()
        before = self._backoff.remaining(now)
        self._backoff.pause_until(now + pause)
        if self._backoff.remaining(now) > before:
            asked = err.retry_after_s if isinstance(err, VapiRateLimitedError) else None
            log.warning(
                "Vapi rate-limited the worker: every call waits",
                pause_s=round(pause, 3),
                retry_after_s=asked,
            )

    def backoff_remaining_s(self) -> float:
        """Seconds left of the worker-wide pause after a 429 (0 when none)."""
        return self._backoff.remaining(self._clock())

    @staticmethod
    def _is_stale_context(run: _Run, err: VapiError) -> bool:
        has_context = run.previous_chat_id is not None or run.session_id is not None
        return (
            has_context
            and not run.stale_context_retried
            and isinstance(err, VapiStatusError)
            and err.http_status in (400, 404)
        )

    async def _wait_for_shared_backoff(self, deadline: float) -> VapiRateLimitedError | None:
        """Wait out a 429 pause of the whole worker; an error instead if it outlasts the deadline.

        A burst of 429s pauses every stream of this worker, not just the one that got it. A
        request whose deadline ends inside the pause fails now instead of sleeping past it.
        """
        remaining = self._backoff.remaining(self._clock())
        if remaining <= 0:
            return None
        if self._clock() + remaining > deadline:
            return VapiRateLimitedError(
                f"Vapi rate-limited this worker for {remaining:.1f} s more, "
                "past this request's deadline",
                retry_after_s=remaining,
            )
        await self._sleep(remaining)
        return None

    def _body(self, run: _Run) -> dict[str, object]:
        request = run.request
        body: dict[str, object] = {
            "assistantId": request.assistant_id or self._settings.default_assistant_id,
            "input": _input_for_vapi(request),
            "stream": True,
        }
        if request.assistant_overrides:
            body["assistantOverrides"] = request.assistant_overrides
        if self._settings.context_mode == "session_id":
            if run.session_id:
                body["sessionId"] = run.session_id
        elif run.previous_chat_id:
            body["previousChatId"] = run.previous_chat_id
        return body

    async def _stream_once(self, run: _Run, headers: Headers) -> _Attempt:
        request = run.request
        attempt = _Attempt(DeltaAcks(self._metrics.delta_publish_seconds.observe, self._clock))
        run.current = attempt
        stream = self._client.stream_chat(
            self._body(run), request_id=request.request_id, attempt=run.attempts
        )
        # aclosing: a cancelled request (shutdown, rebalance) closes its HTTP stream at once.
        try:
            async with contextlib.aclosing(stream):
                if self._settings.coalesce_ms > 0 or self._settings.coalesce_chars > 0:
                    await self._stream_coalesced(run, attempt, stream, headers)
                else:
                    async for event in stream:
                        self._note_event(run, attempt, event)
                        await self._publish(run, attempt, event.delta, headers)
        finally:
            self._count_deltas(attempt)
        # The final response may only follow once every delta of this attempt is on the broker.
        await attempt.acks.wait()
        return attempt

    def _note_event(self, run: _Run, attempt: _Attempt, event: StreamDelta) -> None:
        if run.first_delta_at is None:
            run.first_delta_at = self._clock()
        attempt.chat_id = event.chat_id
        attempt.session_id = event.session_id or attempt.session_id
        # Checked before the text is kept or published: a stream holds at most the limit.
        attempt.chars += len(event.delta)
        if attempt.chars > self._settings.max_reply_chars:
            raise ReplyTooLargeError(
                f"the reply is longer than MAX_REPLY_CHARS ({self._settings.max_reply_chars} "
                "characters)"
            )

    async def _stream_coalesced(
        self,
        run: _Run,
        attempt: _Attempt,
        stream: AsyncIterator[StreamDelta],
        headers: Headers,
    ) -> None:
        """Publish held text by size as deltas arrive, and by age from a timer task."""
        max_delay_s = self._settings.coalesce_ms / 1000
        coalescer = DeltaCoalescer(max_chars=self._settings.coalesce_chars, max_delay_s=max_delay_s)
        # Two tasks publish (this one and the timer); the lock keeps seq and send order equal.
        lock = asyncio.Lock()

        async def emit(text: str | None) -> None:
            if text:
                async with lock:
                    await self._publish(run, attempt, text, headers)

        async def flush_by_age() -> None:
            while True:
                due = coalescer.due_in(self._clock())
                await asyncio.sleep(max_delay_s if due is None else due)
                if coalescer.due_in(self._clock()) == 0.0:
                    await emit(coalescer.flush())

        timer = asyncio.create_task(flush_by_age()) if max_delay_s > 0 else None
        try:
            async for event in stream:
                self._note_event(run, attempt, event)
                await emit(coalescer.add(event.delta, self._clock()))
            await emit(coalescer.flush())
        finally:
            if timer is not None:
                timer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await timer

    async def _publish(self, run: _Run, attempt: _Attempt, text: str, headers: Headers) -> None:
        request = run.request
        # Text over MAX_DELTA_TEXT_BYTES as JSON goes out as several deltas (consecutive seq);
        # text of at most SAFE_DELTA_CHARS always fits and is not measured.
        pieces = (
            (text,) if len(text) <= SAFE_DELTA_CHARS else split_text(text, MAX_DELTA_TEXT_BYTES)
        )
        for piece in pieces:
            delta = ChatDelta(
                request_id=request.request_id,
                conversation_id=request.conversation_id,
                chat_id=attempt.chat_id or "",
                attempt=run.attempts,
                seq=attempt.seq,
                delta=piece,
                ts=self._wall(),
            )
            received = self._clock()
            attempt.acks.add(await self._publisher.send_delta(delta, headers), received)
            attempt.parts.append(piece)
            attempt.seq += 1
            run.delta_count += 1
            attempt.uncounted += 1
            if attempt.uncounted >= DELTA_COUNT_BATCH:
                self._count_deltas(attempt)

    def _count_deltas(self, attempt: _Attempt) -> None:
        if attempt.uncounted:
            self._metrics.deltas_total.inc(attempt.uncounted)
            attempt.uncounted = 0

    def _timings(self, run: _Run) -> Timings:
        first = run.first_delta_at
        return Timings(
            queued_ms=round(run.queued_ms, 3),
            first_delta_ms=None if first is None else round((first - run.started) * 1000, 3),
            total_ms=round((self._clock() - run.started) * 1000, 3),
        )

    def _completed(self, run: _Run, attempt: _Attempt, check: ReplyCheck = UNCHECKED) -> Outcome:
        request = run.request
        # An incomplete stream's response carries Vapi's whole text; the chat id is chained as
        # for any completed reply: Vapi's chat is whole, and the next turn continues from it.
        text = "".join(attempt.parts) if check.vapi_text is None else check.vapi_text
        if len(text) > self._settings.max_reply_chars:
            err = ReplyTooLargeError(
                f"Vapi's reply is longer than MAX_REPLY_CHARS ({self._settings.max_reply_chars} "
                "characters)"
            )
            log.warning("request failed", error=err.code, message=str(err))
            return self._failed(run, err)
        cost = check.cost
        response = ChatResponse(
            request_id=request.request_id,
            conversation_id=request.conversation_id,
            chat_id=attempt.chat_id,
            previous_chat_id=run.previous_chat_id,
            status="completed",
            text=text,
            delta_count=attempt.seq,
            attempts=run.attempts,
            context_reset=run.context_reset,
            error=None,
            timings=self._timings(run),
            metadata=request.metadata,
            cost=None
            if cost is None
            else Cost(
                usd=cost.usd,
                prompt_tokens=cost.prompt_tokens,
                completion_tokens=cost.completion_tokens,
            ),
            stream_complete=check.stream_complete,
        )
        return Outcome(response, attempt.chat_id, attempt.session_id)

    def _failed(
        self, run: _Run, err: WorkerError, status: Literal["failed", "expired"] = "failed"
    ) -> Outcome:
        request = run.request
        response = ChatResponse(
            request_id=request.request_id,
            conversation_id=request.conversation_id,
            chat_id=None,
            previous_chat_id=run.previous_chat_id,
            status=status,
            text="",
            delta_count=0,
            attempts=run.attempts,
            context_reset=run.context_reset,
            error=ErrorInfo(
                code=err.code,
                message=str(err),
                retryable=err.retryable,
                http_status=err.http_status if isinstance(err, VapiError) else None,
            ),
            timings=self._timings(run),
            metadata=request.metadata,
        )
        return Outcome(response, None, None)

    def _record_outcome(self, run: _Run, response: ChatResponse) -> None:
        # chat_worker_requests_total is counted by the request's lifecycle (worker.lifecycle).
        self._metrics.request_duration_seconds.observe(self._clock() - run.started)
        if run.first_delta_at is not None:
            self._metrics.time_to_first_delta_seconds.observe(run.first_delta_at - run.started)
        log.info(
            "request finished",
            outcome=response.status,
            attempts=run.attempts,
            deltas=run.delta_count,
            context_reset=run.context_reset,
            queued_ms=response.timings.queued_ms,
            first_delta_ms=response.timings.first_delta_ms,
            total_ms=response.timings.total_ms,
        )


def _input_for_vapi(request: ChatRequest) -> object:
    """The request's input as Vapi's ``input``: a string, or a list of ``{role, content}``."""
    if isinstance(request.input, str):
        return request.input
    return [message.model_dump() for message in request.input]


def _retry_reason(err: VapiError) -> str:
    """A bounded label value for ``chat_worker_retries_total``."""
    code = err.code
    if code == "vapi_rate_limited":
        return "rate_limited"
    if code == "vapi_http_error":
        return "server_error"
    if code == "vapi_connect_error":
        return "connect"
    if code == "vapi_timeout":
        return "timeout"
    if code == "vapi_stream_broken":
        return "stream_broken"
    return "other"
