"""The Faust app: topics, the ``chat-state`` table, and the one agent that feeds the scheduler.

Why one dispatcher agent with manual acks and not ``@app.agent(concurrency=N)``: Faust's actors
share one queue, so neither per-conversation order nor "never commit past an unfinished request"
holds (design.md section 8). Here the agent only takes records; ``KeyOrderedScheduler`` decides
which may run, and acks go back to Faust strictly in offset order per partition, only for the
leading run of finished records, so Faust's commit can never pass a request still in flight.

Every request runs in its own task, created inside the agent loop while its event is Faust's
current event: the task's copy of that context variable is what makes its table write land in
the request's own changelog partition, however late the write happens.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import faust
import structlog
from faust.transport.drivers.aiokafka import Producer as AIOKafkaProducer
from pydantic import SecretStr

from worker.config import Settings
from worker.errors import InvalidRequestError
from worker.messages import (
    ChatDelta,
    ChatRequest,
    ChatResponse,
    dead_letter_headers,
    decode_request,
    output_headers,
)
from worker.metrics import WorkerMetrics
from worker.pipeline import HandlerSettings, RequestHandler
from worker.retry import RetryPolicy, SharedBackoff
from worker.scheduler import KeyOrderedScheduler, Ticket
from worker.state import ConversationStore
from worker.vapi.client import VapiClient, VapiTimeouts

log = structlog.get_logger(__name__)

Headers = Sequence[tuple[str, bytes]]


class IdempotentProducer(AIOKafkaProducer):
    """Faust's producer with idempotence on.

    Faust enables it only under ``exactly_once``, which would hold every delta back until the
    transaction commits. Idempotence alone keeps a partition's records in order and free of
    producer-retry duplicates, which is what the delta stream needs.
    """

    def _settings_extra(self) -> dict[str, Any]:
        return {"acks": "all", "enable_idempotence": True}


class KafkaPublisher:
    """Publishes the worker's outputs through Faust's producer (one producer per process)."""

    def __init__(self, app: faust.App, settings: Settings) -> None:
        self._app = app
        self._deltas = settings.topic_deltas
        self._responses = settings.topic_responses
        self._dlq = settings.topic_dlq

    async def send_delta(self, delta: ChatDelta, headers: Headers) -> Awaitable[object]:
        fut: Awaitable[object] = await self._app.producer.send(
            self._deltas,
            delta.conversation_id.encode(),
            delta.encode(),
            None,
            None,
            output_headers(ChatDelta.SCHEMA, headers),
        )
        return fut

    async def send_response(self, response: ChatResponse, headers: Headers) -> None:
        fut = await self._app.producer.send(
            self._responses,
            response.conversation_id.encode(),
            response.encode(),
            None,
            None,
            output_headers(ChatResponse.SCHEMA, headers),
        )
        # Faust flushes before committing but never surfaces a failed send: await this one.
        await fut

    async def send_dead_letter(self, event: Any, error: InvalidRequestError) -> None:
        message = event.message
        headers = dead_letter_headers(
            list(message.headers or ()),
            reason=error.reason,
            detail=error.detail or "",
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
        )
        fut = await self._app.producer.send(
            self._dlq, message.key, message.value, None, None, cast(Any, headers)
        )
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

    def start(self, ticket: Ticket[Job]) -> None:
        self.ticket = ticket
        self.go.set()


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
        self._events: dict[tuple[Any, int], Any] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._capacity = asyncio.Event()
        self._stream: Any = None

    async def take(self, stream: Any, event: Any) -> None:
        """Accept one record from the agent loop; waits while the buffer is full (backpressure)."""
        self._stream = stream
        while not self.scheduler.has_capacity:
            self._capacity.clear()
            await self._capacity.wait()
        message = event.message
        job = self._decode(event)
        self._events[(message.tp, message.offset)] = event
        # Created here, inside the agent loop: the task's context holds this event as Faust's
        # current event, which routes the request's table write to its own partition.
        task = asyncio.create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        key = job.request.conversation_id if job.request is not None else None
        for ticket in self.scheduler.submit(message.tp, message.offset, key, job):
            ticket.item.start(ticket)
        self._metrics.buffered.set(self.scheduler.buffered)

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
        structlog.contextvars.clear_contextvars()
        try:
            if job.request is None:
                await self._dead_letter(job)
            else:
                await self._process(job, job.request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Kafka refused an output or a bug: this record is not acked, so it is not lost;
            # the worker stops and its partitions go to a healthy replica.
            log.exception("request crashed the worker")
            await self._on_crash(exc)
            return
        await self._finish(job)

    async def _dead_letter(self, job: Job) -> None:
        assert job.invalid is not None
        message = job.event.message
        await self._publisher.send_dead_letter(job.event, job.invalid)
        self._metrics.requests_total.labels(outcome="invalid").inc()
        self._metrics.dlq_total.labels(reason=job.invalid.reason).inc()
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
        if state.has_finished(request.request_id):
            self._metrics.requests_total.labels(outcome="duplicate").inc()
            log.info("duplicate request skipped")
            return
        self._metrics.in_flight.inc()
        try:
            outcome = await self._handler.handle(
                request, state, queued_at=job.queued_at, trace_headers=job.trace_headers
            )
        finally:
            self._metrics.in_flight.dec()
        new_state = state.after_request(
            request.request_id,
            outcome.chat_id,
            outcome.session_id,
            keep=self._settings.worker_completed_ids_kept,
        )
        self._store.put(request.conversation_id, new_state, job.event)

    async def _finish(self, job: Job) -> None:
        assert job.ticket is not None
        completion = self.scheduler.complete(job.ticket)
        for ticket in completion.start:
            ticket.item.start(ticket)
        for tp, offset in completion.ack:
            event = self._events.pop((tp, offset))
            await self._stream.ack(event)
        self._metrics.buffered.set(self.scheduler.buffered)
        self._capacity.set()

    def revoke(self, partitions: set[Any]) -> None:
        """Forget the records of revoked partitions; cancel their running requests."""
        # With stream_wait_empty Faust drains before it revokes, so normally nothing is left;
        # whatever is must not be acked later against a partition this worker lost.
        for ticket in self.scheduler.revoke(partitions):
            log.warning("request of a revoked partition still running", offset=ticket.offset)
        for key in [k for k in self._events if k[0] in partitions]:
            del self._events[key]
        self._capacity.set()


@dataclass
class Worker:
    """The assembled app, kept together so the CLI and the tests can reach its parts."""

    app: faust.App
    settings: Settings
    dispatcher: Dispatcher
    metrics: WorkerMetrics
    client: VapiClient
    handler: RequestHandler

    def vapi_auth_ok(self) -> bool:
        return self.handler.auth_ok


def build_worker(
    settings: Settings,
    metrics: WorkerMetrics,
    *,
    vapi_base_url: str,
    vapi_api_key: str,
) -> Worker:
    """Create the Faust app and wire the request path (no I/O happens here)."""
    app = faust.App(
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
        datadir=tempfile.mkdtemp(prefix="vapi-worker-"),
        broker_credentials=_kafka_credentials(settings),
    )
    cast(Any, app.transport).Producer = IdempotentProducer

    requests_topic = app.topic(
        settings.topic_requests,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.topic_partitions,
    )
    table = app.Table(
        "chat-state",
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
    )
    publisher = KafkaPublisher(app, settings)
    handler = RequestHandler(
        client,
        publisher,
        RetryPolicy(
            max_attempts=settings.retry_max_attempts,
            base_delay_s=settings.retry_base_delay_s,
            max_delay_s=settings.retry_max_delay_s,
        ),
        SharedBackoff(),
        metrics,
        HandlerSettings(
            default_assistant_id=settings.vapi_assistant_id,
            context_mode=settings.vapi_context_mode,
            request_deadline_s=settings.vapi_request_timeout_s * settings.retry_max_attempts,
            coalesce_ms=settings.worker_delta_coalesce_ms,
            coalesce_chars=settings.worker_delta_coalesce_chars,
        ),
    )

    async def crash(exc: BaseException) -> None:
        await app.crash(exc)

    dispatcher = Dispatcher(
        settings, handler, ConversationStore(table), publisher, metrics, on_crash=crash
    )

    async def on_revoked(_app: faust.App, revoked: set[Any], **_: Any) -> None:
        dispatcher.revoke(revoked)

    cast(Any, app.on_partitions_revoked).connect(on_revoked)

    @app.agent(requests_topic, name="dispatch")
    async def dispatch(stream: Any) -> None:
        manual = stream.noack()
        async for event in manual.events():
            await dispatcher.take(manual, event)

    return Worker(app, settings, dispatcher, metrics, client, handler)


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
