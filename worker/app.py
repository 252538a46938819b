"""The Faust app: topics, the ``chat-state`` table, and the one agent that feeds the scheduler.

Why one dispatcher agent with manual acks and not ``@app.agent(concurrency=N)``: Faust's actors
share one queue, so neither per-conversation order nor "never commit past an unfinished request"
holds (docs/design.md §10.1). Here the agent only takes records; ``KeyOrderedScheduler`` decides
which may run, and acks go back to Faust strictly in offset order per partition, only for the
leading run of finished records, so Faust's commit can never pass a request still in flight.

Every request runs in its own task, created inside the agent loop while its event is Faust's
current event: the task's copy of that context variable is what makes its table write land in
the request's own changelog partition, however late the write happens.
"""

from __future__ import annotations

import asyncio
import gc
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import faust
import structlog
from aiokafka.errors import IllegalStateError
from aiokafka.structs import TopicPartition
from faust.exceptions import NotReady
from faust.transport.drivers.aiokafka import Producer as AIOKafkaProducer
from faust.types import TP
from mode.utils.objects import cached_property
from mode.utils.queues import FlowControlEvent
from pydantic import SecretStr

from worker.budget import budget_exceeded
from worker.config import Settings
from worker.consumer import RewindingConsumer
from worker.errors import (
    BudgetExceededError,
    InvalidRequestError,
    ProducerClosedError,
    RequestExpiredError,
)
from worker.expiry import ConversationExpiry, sweep_interval_s
from worker.failures import stops_the_worker
from worker.fleet_limits import FleetLimits, LimitedVapiClient, follow_assignments
from worker.held_records import drop_held_records, flush_within
from worker.limits import fit_dead_letter
from worker.messages import (
    ChatDelta,
    ChatRequest,
    ChatResponse,
    Headers,
    dead_letter_headers,
    decode_request,
)
from worker.metrics import WorkerMetrics
from worker.pipeline import HandlerSettings, Outcome, RequestHandler
from worker.reply_check import ReplyChecker
from worker.request_age import request_expiry
from worker.retry import RetryPolicy, SharedBackoff
from worker.scheduler import KeyOrderedScheduler, Ticket
from worker.state import ConversationState, ConversationStore, SourcePosition, StateTable
from worker.topics import STATE_TABLE
from worker.vapi.client import VapiClient, VapiTimeouts

log = structlog.get_logger(__name__)

#: The log line of a release that cut final steps off or dropped the producer's records.
FINAL_STEPS_CUT_OFF = "final steps cut off at the finish timeout, their records left for redelivery"
#: The error of sends on the producer after its records were dropped, and of the crash it causes.
PRODUCER_CLOSED = (
    "Kafka did not take the worker's outputs within WORKER_FINISH_TIMEOUT_S after the grace "
    "period; the producer dropped them and is closed, the worker stops"
)


class IdempotentProducer(AIOKafkaProducer):
    """Faust's producer with idempotence on.

    Faust enables it only under ``exactly_once``, which would hold every delta back until the
    transaction commits. Idempotence alone keeps a partition's records in order and free of
    producer-retry duplicates, which is what the delta stream needs.
    """

    def _settings_extra(self) -> dict[str, Any]:
        return {"acks": "all", "enable_idempotence": True}


def _transactional(producer: Any) -> bool:
    # aiokafka's ``send`` refuses records outside a transaction on a transactional producer;
    # the direct path must not skip that check (this worker's producer is idempotent only).
    txn = producer._txn_manager  # noqa: SLF001  aiokafka has no public "is transactional"
    return txn is not None and txn.transactional_id is not None


class KafkaPublisher:
    """Publishes the worker's outputs through Faust's producer (one producer per process)."""

    #: Conversations whose delta partition is remembered; the map is dropped when it is full.
    MAX_REMEMBERED_PARTITIONS = 65_536

    def __init__(
        self, app: faust.App, settings: Settings, *, also_written: Sequence[str] = ()
    ) -> None:
        self._app = app
        #: The producer's ``max_request_size``: no record larger than this may be sent.
        self.max_record_bytes: int = app.conf.producer_max_request_size
        self._deltas = settings.topic_deltas
        self._responses = settings.topic_responses
        self._dlq = settings.topic_dlq
        self._delta_partitions: dict[bytes, TopicPartition] = {}
        #: Every topic this process writes to: the outputs, and ``also_written`` (the changelog).
        self.written_topics = (self._deltas, self._responses, self._dlq, *also_written)
        self._tracking = False

    def _track_written_topics(self, producer: Any) -> None:
        """Have the producer keep every written topic in its metadata, from the first write on.

        aiokafka fetches the metadata of all topics until it is asked for one it does not know
        (a send to it); from then on it refreshes only the topics asked for so. A topic known
        from an all-topics fetch was never asked for: it drops out of the metadata at the next
        refresh, and a batch for it that was still waiting then is never sent: its partition
        stalls (seen with the changelog created late at start-up). Tracked from the start, no
        written topic can drop out.
        """
        if not self._tracking:
            for topic in self.written_topics:
                producer.client.add_topic(topic)
            self._tracking = True

    async def send_delta(self, delta: ChatDelta, headers: Headers) -> Awaitable[object]:
        key = delta.conversation_id.encode()
        producer = self._aiokafka_producer()
        # The producer would hash the key again for every delta (pure-Python murmur2 and two
        # copies of the partition list): the partition of a conversation is looked up once.
        tp = self._delta_partitions.get(key)
        if tp is not None and not _transactional(producer):
            # A known partition goes straight into the producer's batch for it: what ``send``
            # does last, without its per-record metadata wait, partition check (a new set of the
            # topic's partitions each time), key/value serializer calls and debug log: ~7 us a
            # delta, 8% of the worker's CPU flat out. Same batches, sequence numbers and acks.
            # The skipped size check holds anyway: the handler splits text that would not fit
            # (``worker.limits.MAX_DELTA_TEXT_BYTES``), so a delta record is never near a limit.
            return cast(
                Awaitable[object],
                await producer._message_accumulator.add_message(  # noqa: SLF001  into the batch: docs/design.md §10.4
                    tp,
                    key,
                    delta.encode(),
                    producer._request_timeout_ms / 1000,  # noqa: SLF001  send's own timeout
                    headers=headers,
                ),
            )
        # Only reached before the fast path above: its batches need the topic tracked.
        self._track_written_topics(producer)
        # Straight to the aiokafka producer under Faust's (the same instance and settings):
        # Faust's send adds, per record, a check of the headers against ``typing.Mapping`` and an
        # ``on_produce_message`` signal nobody here listens to: a few us per delta, for nothing.
        fut: Awaitable[object] = await producer.send(
            self._deltas,
            delta.encode(),
            key=key,
            partition=None if tp is None else tp.partition,
            headers=headers,
        )
        if tp is None:
            # After a send, so the topic's metadata is known; same partitioner, same answer.
            if len(self._delta_partitions) >= self.MAX_REMEMBERED_PARTITIONS:
                self._delta_partitions.clear()
            partition = self._app.producer.key_partition(self._deltas, key).partition
            self._delta_partitions[key] = TopicPartition(self._deltas, partition)
        return fut

    def _aiokafka_producer(self) -> Any:
        # ``_ensure_producer`` is Faust's own accessor (faust-streaming is pinned); it raises
        # NotReady before the producer has started.
        return cast(Any, self._app.producer)._ensure_producer()  # noqa: SLF001  no public getter

    async def send_response(self, response: ChatResponse, headers: Headers) -> None:
        self._track_written_topics(self._aiokafka_producer())
        fut = await self._app.producer.send(
            self._responses,
            response.conversation_id.encode(),
            response.encode(),
            None,
            None,
            list(headers),
        )
        # Faust flushes before committing but never surfaces a failed send: await this one.
        await fut

    async def flush_within(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the broker's answer to every record the producer holds."""
        try:
            producer = self._aiokafka_producer()
        except NotReady:
            return True  # a producer that never started holds nothing
        return await flush_within(producer, timeout_s)

    async def drop_held_records(self, reason: str) -> dict[str, int]:
        """Drop what the producer holds, so none of it is ever sent; returns the count by topic."""
        return await drop_held_records(self._aiokafka_producer(), reason)

    async def send_dead_letter(self, event: Any, error: InvalidRequestError) -> None:
        self._track_written_topics(self._aiokafka_producer())
        message = event.message
        headers = dead_letter_headers(
            list(message.headers or ()),
            reason=error.reason,
            detail=error.detail or "",
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
        )
        # A record may be larger than this producer may send (the request topic's limit is the
        # broker's, not ours): it is dead-lettered cut to fit, with a header saying so.
        key, value, fitted = fit_dead_letter(
            message.key, message.value, headers, max_bytes=self.max_record_bytes
        )
        if len(fitted) != len(headers):
            log.warning(
                "dead letter cut to fit a record",
                original_bytes=len(message.value or b""),
                limit=self.max_record_bytes,
            )
        fut = await self._app.producer.send(self._dlq, key, value, None, None, cast(Any, fitted))
        await fut


@dataclass(eq=False, slots=True)
class Job:
    """One taken record on its way through the scheduler."""

    event: Any
    queued_at: float
    request: ChatRequest | None
    invalid: InvalidRequestError | None
    trace_headers: Headers = ()
    go: asyncio.Event = field(default_factory=asyncio.Event)
    ticket: Ticket[Job] | None = None
    task: asyncio.Task[None] | None = None
    #: Set once Vapi's part is done and the final response is being published and recorded:
    #: a release waits for this short step instead of cancelling it half-way.
    finishing: bool = False
    #: Set once the request's final response is on the broker.
    published: bool = False

    def start(self, ticket: Ticket[Job]) -> None:
        self.ticket = ticket
        self.go.set()


def source_position(message: Any) -> SourcePosition | None:
    """Where a request record sits in its topic; None for a record without a timestamp."""
    if message.timestamp is None or message.timestamp < 0:
        return None
    return SourcePosition(message.partition, message.offset, round(message.timestamp * 1000))


class Dispatcher:
    """Takes records from the agent, runs them through the scheduler, acks them in order."""

    def __init__(
        self,
        settings: Settings,
        handler: RequestHandler,
        store: ConversationStore,
        publisher: KafkaPublisher,
        metrics: WorkerMetrics,
        on_crash: Callable[[BaseException], Awaitable[None]],
    ) -> None:
        self._settings = settings
        self._handler = handler
        self._store = store
        self._publisher = publisher
        self._metrics = metrics
        self._on_crash = on_crash
        self.scheduler: KeyOrderedScheduler[Job] = KeyOrderedScheduler(
            settings.worker_max_in_flight, settings.worker_max_buffered
        )
        self._jobs: dict[tuple[Any, int], Job] = {}
        #: Per partition, the highest offset taken since the last release.
        self._last_taken: dict[Any, int] = {}
        self._capacity = asyncio.Event()
        self._releasing = False
        #: True from the end of a release until Faust assigns partitions again.
        self._between_assignments = False
        self._stream: Any = None
        self._consumer: Any = None

    async def take(self, stream: Any, event: Any) -> None:
        """Accept one record from the agent loop; waits while the buffer is full (backpressure)."""
        self._stream = stream
        while not self.scheduler.has_capacity and not self._releasing:
            self._capacity.clear()
            await self._capacity.wait()
        message = event.message
        if self._releasing or self._between_assignments:
            # Redelivered to whoever owns the partition next. Between a release and the next
            # assignment no record belongs to this worker: Faust can still hand some over (a
            # recovery of the revoked assignment ending after the revocation resumes the flow),
            # and taking them would run them outside any assignment and skip their redelivery.
            self._forget_message(message)
            return
        if self._taken_before(stream, message):
            return
        job = self._decode(event)
        self._jobs[(message.tp, message.offset)] = job
        # Created here, inside the agent loop: the task's context holds this event as Faust's
        # current event, which routes the request's table write to its own partition.
        job.task = asyncio.create_task(self._run(job))
        key = job.request.conversation_id if job.request is not None else None
        for ticket in self.scheduler.submit(message.tp, message.offset, key, job):
            ticket.item.start(ticket)
        self._metrics.buffered.set(self.scheduler.buffered)

    def set_max_in_flight(self, limit: int) -> None:
        """Run at most ``limit`` requests at once from now on (``worker.fleet_limits``)."""
        for ticket in self.scheduler.set_max_in_flight(limit):
            ticket.item.start(ticket)

    def has_pending(self, partition: int, conversation_id: str) -> bool:
        """True while a record of the conversation, taken from ``partition``, is unfinished."""
        return self.scheduler.has_pending(
            TP(self._settings.topic_requests, partition), conversation_id
        )

    def _taken_before(self, stream: Any, message: Any) -> bool:
        """True for a record Faust hands over twice: the copy is dropped, the original runs on.

        After an assignment Faust resumes the partitions, then seeks them to the committed
        offset while its fetcher is already running: records handed over before the seek come
        again. Acking the copy could commit past the still-running original, so it is only
        dropped from Faust's unacked set.
        """
        last = self._last_taken.get(message.tp)
        if last is None or message.offset > last:
            self._last_taken[message.tp] = message.offset
            return False
        self._consumer = stream.app.consumer
        self._forget_message(message)
        log.warning(
            "record delivered twice, copy skipped",
            partition=message.partition,
            offset=message.offset,
            last_taken=last,
        )
        return True

    def _decode(self, event: Any) -> Job:
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
            return Job(event, time.monotonic(), None, err)
        return Job(event, time.monotonic(), request, None, headers)

    def _check_assistant(self, request: ChatRequest) -> None:
        allowlist = self._settings.vapi_assistant_allowlist
        if request.assistant_id is not None and allowlist and request.assistant_id not in allowlist:
            raise InvalidRequestError(
                "assistant_not_allowed",
                detail=f"assistant_id {request.assistant_id[:80]!r} is not in the allowlist",
            )

    async def _run(self, job: Job) -> None:
        await job.go.wait()
        if self._releasing:
            return  # started while this worker lets go of its partitions: leave it for the next
        structlog.contextvars.clear_contextvars()
        try:
            if job.request is None:
                await self._dead_letter(job)
            else:
                await self._process(job, job.request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not await self._survive(job, exc):
                return
        await self._finish(job)

    async def _survive(self, job: Job, exc: Exception) -> bool:
        """Handle a request's failure; True when the worker goes on (``worker.failures``).

        Kafka gone: the record is not acked, so it is not lost; the worker stops and its
        partitions go to a healthy replica. Anything else ends this one request: logged with its
        traceback, counted, a ``failed`` response (``internal_error``) unless its final response
        is already out, and the record acked so the partition goes on.
        """
        if stops_the_worker(exc):
            log.error("Kafka refused an output: the worker stops", exc_info=exc)
            await self._on_crash(exc)
            return False
        request = job.request
        if request is None or job.published:
            log.error("request ended by an internal error", exc_info=exc)
            self._metrics.internal_errors_total.inc()
            return True
        handled, job.finishing = job.finishing, True
        try:
            outcome = self._handler.internal_failure(
                request, exc, queued_at=job.queued_at, handled=handled
            )
            await self._record(job, request, self._store.get(request.conversation_id), outcome)
        except Exception as again:
            if stops_the_worker(again):
                log.error("Kafka refused an output: the worker stops", exc_info=again)
                await self._on_crash(again)
                return False
            log.error("the failed response could not be published either", exc_info=again)
        return True

    async def _dead_letter(self, job: Job) -> None:
        assert job.invalid is not None
        message = job.event.message
        await self._publisher.send_dead_letter(job.event, job.invalid)
        self._metrics.requests_total.labels(outcome="invalid").inc()
        self._metrics.count_dead_letter(job.invalid.reason)
        log.warning(
            "record sent to the dead-letter topic",
            reason=job.invalid.reason,
            detail=job.invalid.detail,
            partition=message.partition,
            offset=message.offset,
        )

    async def _process(self, job: Job, request: ChatRequest) -> None:
        structlog.contextvars.bind_contextvars(
            request_id=request.request_id, conversation_id=request.conversation_id
        )
        state = self._store.get(request.conversation_id)
        source = source_position(job.event.message)
        if state.has_finished(request.request_id, source):
            self._metrics.requests_total.labels(outcome="duplicate").inc()
            log.info("duplicate request skipped", offset=job.event.message.offset)
            return
        refusal = self._refusal(job, request, state)
        if refusal is not None:
            await self._refuse(job, request, refusal)
            return
        self._metrics.in_flight.inc()
        try:
            outcome = await self._handler.handle(
                request, state, queued_at=job.queued_at, trace_headers=job.trace_headers
            )
        finally:
            self._metrics.in_flight.dec()
        job.finishing = True
        await self._record(job, request, state, outcome)

    def _refusal(
        self, job: Job, request: ChatRequest, state: ConversationState
    ) -> RequestExpiredError | BudgetExceededError | None:
        """Why the request may not call Vapi: too old to start, or its conversation over budget."""
        return request_expiry(
            now_s=time.time(),
            expires_at=request.expires_at,
            record_timestamp_s=job.event.message.timestamp,
            max_age_s=self._settings.worker_request_max_age_s,
        ) or budget_exceeded(state.spent_usd, self._settings.worker_conversation_budget_usd)

    async def _refuse(
        self, job: Job, request: ChatRequest, err: RequestExpiredError | BudgetExceededError
    ) -> None:
        """End a request that may not start (too old, or over budget) without calling Vapi.

        No table write: the conversation's state (chat id, spend, when it was last active)
        stays as it was. A redelivered copy is judged again, and refused again.
        """
        job.finishing = True
        outcome = self._handler.refuse(request, err, queued_at=job.queued_at)
        await self._handler.publish(outcome, job.trace_headers)
        job.published = True

    async def _record(
        self, job: Job, request: ChatRequest, state: ConversationState, outcome: Outcome
    ) -> None:
        """Publish the final response, then remember the request as finished."""
        await self._handler.publish(outcome, job.trace_headers)
        job.published = True
        new_state = state.after_request(
            request.request_id,
            outcome.chat_id,
            outcome.session_id,
            keep=self._settings.worker_completed_ids_kept,
            source=source_position(job.event.message),
            active_ms=round(time.time() * 1000),
            cost_usd=outcome.response.cost.usd if outcome.response.cost is not None else 0.0,
        )
        await self._store.put(request.conversation_id, new_state, job.event)

    async def _finish(self, job: Job) -> None:
        assert job.ticket is not None
        completion = self.scheduler.complete(job.ticket)
        for ticket in completion.start:
            ticket.item.start(ticket)
        for tp, offset in completion.ack:
            done = self._jobs.pop((tp, offset))
            await self._stream.ack(done.event)
        self._metrics.buffered.set(self.scheduler.buffered)
        self._capacity.set()

    async def release(self, consumer: Any, grace_s: float) -> bool:
        """Let go of every taken record before Faust's drain: on shutdown and on rebalance.

        Requests that have not started are dropped at once; running ones get ``grace_s`` to
        finish (and are acked as usual), then are cancelled, which closes their HTTP streams.
        Those already in their final step (response, then table write) get up to
        ``WORKER_FINISH_TIMEOUT_S`` more, then are cancelled too. The producer then gets the rest
        of that time to deliver what it holds; what it still holds is dropped
        (``worker.held_records``), so nothing of a released request can land once its partition
        has moved on. The release so ends within ``grace_s`` + ``WORKER_FINISH_TIMEOUT_S``
        (and ``held_records.SENDER_STOP_S``).

        Nothing unfinished is acked, so nothing unfinished is committed: the partition's next
        owner (this worker again, after a rebalance) gets those records from the committed
        offset. Faust's drain waits for every taken, unacked record (``stream_wait_empty``);
        dropping our hold on them is what lets it end within the grace period.

        Returns False when the producer's records were dropped: it can send nothing more, so
        the worker has to stop.
        """
        self._releasing = True
        self._consumer = consumer
        self._capacity.set()
        try:
            grace_end = time.monotonic() + grace_s
            finish_end = grace_end + self._settings.worker_finish_timeout_s
            await self._let_running_finish(grace_end, finishing_only=False)
            self._cancel_running(finishing=False)
            await self._let_running_finish(finish_end, finishing_only=True)
            cut = [
                job.request.request_id
                for job in self._cancel_running(finishing=True)
                if job.request
            ]
            tasks = [job.task for job in self._jobs.values() if job.task is not None]
            await asyncio.gather(*tasks, return_exceptions=True)
            delivered = await self._publisher.flush_within(finish_end - time.monotonic())
            dropped = {} if delivered else await self._publisher.drop_held_records(PRODUCER_CLOSED)
            if cut or not delivered:
                log.error(
                    FINAL_STEPS_CUT_OFF,
                    final_steps=len(cut),
                    request_ids=cut[:20],
                    records_dropped=sum(dropped.values()),
                    dropped_by_topic=dropped,
                    producer_closed=not delivered,
                    finish_timeout_s=self._settings.worker_finish_timeout_s,
                )
            # Every partition taken from since the last release, also those with nothing pending:
            # their next records may start below the last offset seen (after a failed commit).
            self.scheduler.revoke({tp for tp, _ in self._jobs} | set(self._last_taken))
            for job in self._jobs.values():
                self._forget_message(job.event.message)
            if self._jobs:
                log.info("released unfinished records for redelivery", records=len(self._jobs))
            self._jobs.clear()
            self._last_taken.clear()
            self._metrics.buffered.set(self.scheduler.buffered)
        finally:
            self._releasing = False
            self._between_assignments = True
        return delivered

    def on_assigned(self) -> None:
        """Faust assigned partitions: records handed over from now on are taken again."""
        self._between_assignments = False

    async def _let_running_finish(self, until: float, *, finishing_only: bool) -> None:
        """Wait until the started requests (or only those in their final step) end, or ``until``."""
        while True:
            remaining = until - time.monotonic()
            running = [
                job.task
                for job in self._jobs.values()
                if job.task is not None
                and not job.task.done()
                and job.go.is_set()
                and (job.finishing or not finishing_only)
            ]
            if not running or remaining <= 0:
                return
            await asyncio.wait(running, timeout=remaining)

    def _cancel_running(self, *, finishing: bool) -> list[Job]:
        """Cancel the unfinished jobs in their final step (or those not in it); returns them."""
        cancelled = [
            job
            for job in self._jobs.values()
            if job.task is not None and not job.task.done() and job.finishing == finishing
        ]
        for job in cancelled:
            assert job.task is not None
            job.task.cancel()
        return cancelled

    async def report_lag(self, consumer: Any, *, rebalancing: bool = False) -> None:
        """Set ``chat_worker_consumer_lag``: records of each partition not yet finished.

        Nothing is read during a rebalance or a release (the assignment is changing), and a
        partition revoked while it is read is skipped: aiokafka's ``highwater`` fails an assertion
        and its ``position`` raises ``IllegalStateError`` for a partition it no longer holds.
        """
        if rebalancing or self._releasing:
            return
        for tp in consumer.assignment():
            if tp.topic != self._settings.topic_requests:
                continue
            try:
                highwater = consumer.highwater(tp)
                pending = self.scheduler.pending_offsets(tp)
                position = pending if pending is not None else await consumer.position(tp)
            except (AssertionError, IllegalStateError):
                continue
            if highwater is None or highwater < 0 or position is None:
                continue
            self._metrics.set_consumer_lag(tp.partition, highwater - position)

    def _forget_message(self, message: Any) -> None:
        # Faust's drain loops while a taken message is unacked and still referenced. Removing it
        # from that set (without acking) ends the wait and leaves its offset uncommitted.
        if self._consumer is not None:
            self._consumer._unacked_messages.discard(message)  # noqa: SLF001  drain's set


class SteadyFlowControl(FlowControlEvent):
    """Faust's flow control, except that resuming a flow that is not suspended clears nothing.

    ``resume()`` empties every stream queue. At the end of table recovery Faust resumes the
    stream partitions, seeks them to the committed offset with the fetcher already running (flow
    control was resumed for the changelog reads), and only then calls ``resume()`` again: records
    queued in that window were emptied out and, being past the seek, never fetched again. Once
    later records were acked the commit passed them: requests lost. Emptying is for records
    queued before a suspension; with nothing suspended, nothing in the queues is stale.
    """

    def resume(self) -> None:
        if self.is_active():
            return
        super().resume()


#: Second-generation collections between full ones (CPython's default is 10).
FULL_COLLECTION_THRESHOLD = 100


class WorkerApp(faust.App):
    """faust.App with two hooks: release the dispatcher's records before Faust drains them, and
    keep records queued after a recovery (:class:`SteadyFlowControl`).

    Faust calls ``_consumer_wait_empty`` on shutdown and on every partition revocation, after it
    has stopped fetching and before it waits for unacked records and commits. It is a private
    method of the pinned faust-streaming version; the e2e shutdown and rebalance tests cover it.
    """

    dispatcher: Dispatcher | None = None
    shutdown_grace_s: float = 25.0
    rebalance_grace_s: float = 3.0
    #: Closes the Vapi client's connections once Faust has stopped (set by ``build_worker``).
    close_vapi_client: Callable[[], Awaitable[None]] | None = None

    async def on_started(self) -> None:
        await super().on_started()
        # Everything built to start the worker (Faust, aiokafka, pydantic schemas: ~100k objects)
        # lives as long as the process. Left in the collector's oldest generation, every full
        # collection walked all of it: pauses of up to 200 ms on this 2-core machine, which
        # stalled every stream at once and were most of the delta p99. Frozen, they are skipped.
        gc.collect()
        gc.freeze()
        # Full collections still took 25-50 ms over what a running worker holds (taken records,
        # streams, producer batches), one or two per 10 s of load (measured with gc.callbacks);
        # ten times rarer, they drop out of a run. Young collections keep their default pace.
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, FULL_COLLECTION_THRESHOLD)

    async def on_stop(self) -> None:
        await super().on_stop()
        if self.close_vapi_client is not None:
            await self.close_vapi_client()

    @cached_property
    def flow_control(self) -> FlowControlEvent:
        return SteadyFlowControl(loop=self.loop)

    async def _consumer_wait_empty(self, consumer: Any, logger: Any) -> None:
        delivered = True
        stopping = bool(self.should_stop)
        if self.dispatcher is not None:
            grace = self.shutdown_grace_s if stopping else self.rebalance_grace_s
            delivered = await self.dispatcher.release(consumer, grace)
        await super()._consumer_wait_empty(consumer, logger)
        if not delivered and not stopping:
            # A rebalance: Faust crashes the app on this, and the process exits for a restart.
            raise ProducerClosedError(PRODUCER_CLOSED)


@dataclass
class Worker:
    """The assembled app, kept together so the CLI and the tests can reach its parts."""

    app: faust.App
    settings: Settings
    dispatcher: Dispatcher
    metrics: WorkerMetrics
    client: VapiClient
    handler: RequestHandler
    publisher: KafkaPublisher

    def vapi_auth_ok(self) -> bool:
        return self.handler.auth_ok

    def vapi_backoff_s(self) -> float:
        """Seconds left of the worker-wide pause after a 429 (0 when none)."""
        return self.handler.backoff_remaining_s()


def build_worker(
    settings: Settings,
    metrics: WorkerMetrics,
    *,
    vapi_base_url: str,
    vapi_api_key: str,
) -> Worker:
    """Create the Faust app and wire the request path (no I/O happens here)."""
    app = WorkerApp(
        settings.worker_app_id,
        broker=[f"kafka://{server}" for server in settings.kafka_bootstrap_servers.split(",")],
        processing_guarantee="at_least_once",
        # Rebalance and shutdown wait for every taken record to be acked (drain), bounded by
        # the Vapi timeouts; see the README's operations section.
        stream_wait_empty=True,
        stream_publish_on_commit=False,
        consumer_auto_offset_reset="earliest",
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication_factor,
        producer_acks=-1,
        producer_linger=0.002,
        # Faust's own web server would expose table contents at /table; ours serves /metrics.
        web_enabled=False,
        store="memory://",
        # A standby copy is of no use to the memory store: it is dropped at the end of every
        # recovery (only active partitions are kept), and a partition that comes to this worker
        # is read from the changelog in full anyway. Meanwhile it held the other workers' tables.
        table_standby_replicas=0,
        datadir=tempfile.mkdtemp(prefix="vapi-worker-"),
        broker_credentials=_kafka_credentials(settings),
        Table=StateTable,
    )
    cast(Any, app.transport).Producer = IdempotentProducer
    cast(Any, app.transport).Consumer = RewindingConsumer

    requests_topic = app.topic(
        settings.topic_requests,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.topic_partitions,
    )
    table = app.Table(
        STATE_TABLE,
        partitions=settings.topic_partitions,
        # str keys and plain dict values both travel as JSON on the changelog.
        key_type=str,
    )
    client = VapiClient(
        vapi_base_url,
        SecretStr(vapi_api_key),
        VapiTimeouts(
            connect_s=settings.vapi_connect_timeout_s,
            first_delta_s=settings.vapi_first_delta_timeout_s,
            stall_s=settings.vapi_stall_timeout_s,
            request_s=settings.vapi_request_timeout_s,
        ),
        max_connections=settings.vapi_max_connections,
        on_malformed=lambda _reason: metrics.malformed_events_total.inc(),
        scrub=settings.secrets(),
    )
    publisher = KafkaPublisher(app, settings, also_written=[table.changelog_topic.get_topic_name()])
    # Fleet limits: every Vapi call goes through them (docs/design.md §3.1).
    fleet = FleetLimits(
        local_max_in_flight=settings.worker_max_in_flight,
        global_max_in_flight=settings.vapi_global_max_in_flight,
        global_requests_per_minute=settings.vapi_global_requests_per_minute,
        retry_after_max_s=settings.retry_after_max_s,
        metrics=metrics,
    )
    handler = RequestHandler(
        LimitedVapiClient(client, fleet),
        publisher,
        RetryPolicy(
            max_attempts=settings.retry_max_attempts,
            base_delay_s=settings.retry_base_delay_s,
            max_delay_s=settings.retry_max_delay_s,
            retry_after_max_s=settings.retry_after_max_s,
        ),
        SharedBackoff(),
        metrics,
        HandlerSettings(
            default_assistant_id=settings.default_assistant_id(),
            context_mode=settings.vapi_context_mode,
            request_deadline_s=settings.vapi_request_deadline_s,
            coalesce_ms=settings.worker_delta_coalesce_ms,
            coalesce_chars=settings.worker_delta_coalesce_chars,
            max_reply_chars=settings.max_reply_chars,
            max_record_bytes=publisher.max_record_bytes,
        ),
        reply_checker=ReplyChecker(
            client, metrics, fetch_timeout_s=settings.vapi_first_delta_timeout_s
        )
        if settings.vapi_fetch_chat
        else None,
    )

    metrics.watch_backoff(handler.backoff_remaining_s)

    async def crash(exc: BaseException) -> None:
        await app.crash(exc)

    dispatcher = Dispatcher(
        settings,
        handler,
        ConversationStore(cast(StateTable, table)),
        publisher,
        metrics,
        on_crash=crash,
    )
    app.dispatcher = dispatcher
    fleet.on_limit(dispatcher.set_max_in_flight)
    follow_assignments(app, fleet, settings.topic_requests, settings.topic_partitions)
    app.close_vapi_client = client.aclose
    app.shutdown_grace_s = settings.worker_shutdown_grace_s
    app.rebalance_grace_s = settings.worker_rebalance_grace_s

    @app.timer(interval=5.0)  # type: ignore[untyped-decorator]  # faust's decorators are untyped
    async def report_lag() -> None:
        await dispatcher.report_lag(app.consumer, rebalancing=app.rebalancing)

    async def on_assigned(_app: Any, *_args: Any, **_kwargs: Any) -> None:
        dispatcher.on_assigned()

    app.on_partitions_assigned.connect(cast(Any, on_assigned))

    state_table = cast(StateTable, table)
    metrics.conversations.set_function(lambda: len(state_table.store.data))
    expiry = ConversationExpiry(
        state_table,
        ttl_s=settings.worker_conversation_ttl_s,
        pending=dispatcher.has_pending,
        on_expired=metrics.conversations_expired_total.inc,
    )

    sweep_every_s = sweep_interval_s(settings.worker_conversation_ttl_s)

    @app.timer(interval=sweep_every_s)  # type: ignore[untyped-decorator]
    async def expire_conversations() -> None:
        partitions = owned_partitions(app, state_table)
        if partitions:
            generation = app.consumer_generation_id
            await expiry.sweep(
                partitions,
                lambda: not app.rebalancing and app.consumer_generation_id == generation,
            )

    @app.agent(requests_topic, name="dispatch")
    async def dispatch(stream: Any) -> None:
        manual = stream.noack()
        async for event in manual.events():
            await dispatcher.take(manual, event)

    return Worker(app, settings, dispatcher, metrics, client, handler, publisher)


def owned_partitions(app: faust.App, table: StateTable) -> set[int]:
    """The table's changelog partitions this worker actively owns; none while it rebalances or
    recovers."""
    if app.rebalancing or not cast(Any, app.tables).recovery.completed.is_set():
        return set()
    changelog = table.changelog_topic.get_topic_name()
    return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == changelog}


def _kafka_credentials(settings: Settings) -> Any:
    """Faust credentials for SASL/TLS, or None for PLAINTEXT."""
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    ssl_context = None
    if protocol in ("SSL", "SASL_SSL"):
        import ssl

        ssl_context = ssl.create_default_context(
            cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
        )
    if protocol == "SSL":
        return ssl_context
    password = (
        settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else ""
    )
    mechanism = settings.kafka_sasl_mechanism
    if mechanism == "PLAIN":
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username or "",
            password=password,
            ssl_context=ssl_context,
        )
    return faust.SASLCredentials(
        username=settings.kafka_sasl_username or "",
        password=password,
        ssl_context=ssl_context,
        mechanism=mechanism,
    )
