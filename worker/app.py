"""The Faust app: topics, the ``chat-state`` table, the one agent, and the parts wired together.

The agent only takes records and hands them to the dispatcher (``worker.dispatcher``), which
schedules, acks and releases them; what running one means is ``worker.lifecycle``'s
(docs/design.md §4).
"""

from __future__ import annotations

import gc
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import faust
import structlog
from aiokafka.structs import TopicPartition
from faust.exceptions import NotReady
from faust.transport.drivers.aiokafka import Producer as AIOKafkaProducer
from mode.utils.objects import cached_property
from mode.utils.queues import FlowControlEvent
from pydantic import SecretStr

from worker.config import Settings
from worker.consumer import RewindingConsumer
from worker.dispatcher import PRODUCER_CLOSED, Dispatcher
from worker.errors import InvalidRequestError, ProducerClosedError
from worker.expiry import ConversationExpiry, sweep_interval_s
from worker.held_records import drop_held_records, flush_within
from worker.lifecycle import RequestLifecycle
from worker.limits import fit_dead_letter
from worker.messages import (
    ChatDelta,
    ChatResponse,
    Headers,
    dead_letter_headers,
)
from worker.metrics import WorkerMetrics
from worker.pipeline import HandlerSettings, RequestHandler
from worker.retry import RetryPolicy, SharedBackoff
from worker.state import ConversationStore, StateTable
from worker.topics import STATE_TABLE
from worker.vapi.client import VapiClient, VapiTimeouts

log = structlog.get_logger(__name__)


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
            delivered = await self.dispatcher.release(grace)
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
    handler = RequestHandler(
        client,
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
    )

    metrics.watch_backoff(handler.backoff_remaining_s)

    async def crash(exc: BaseException) -> None:
        await app.crash(exc)

    lifecycle = RequestLifecycle(
        settings,
        handler,
        ConversationStore(cast(StateTable, table)),
        publisher,
        metrics,
        on_crash=crash,
    )
    dispatcher = Dispatcher(
        settings, lifecycle, publisher, metrics, consumer=lambda: cast(Any, app.consumer)
    )
    app.dispatcher = dispatcher
    app.close_vapi_client = client.aclose
    app.shutdown_grace_s = settings.worker_shutdown_grace_s
    app.rebalance_grace_s = settings.worker_rebalance_grace_s

    @app.timer(interval=5.0)  # type: ignore[untyped-decorator]  # faust's decorators are untyped
    async def report_lag() -> None:
        await dispatcher.lag.report(
            cast(Any, app.consumer), paused=app.rebalancing or dispatcher.releasing
        )

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
