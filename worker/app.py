"""The Faust app: topics, the ``chat-state`` table, the one agent, and the parts wired together.

The agent only takes records and hands them to the dispatcher (``worker.dispatcher``), which
schedules, acks and releases them; what running one means is ``worker.lifecycle``'s
(docs/design.md §4).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any, cast

import faust
from pydantic import SecretStr

from worker.config import Settings
from worker.dispatcher import Dispatcher
from worker.expiry import ConversationExpiry, sweep_interval_s
from worker.fleet_limits import FleetLimits, LimitedVapiClient, follow_assignments
from worker.kafka_adapters import (
    FaustApp,
    IdempotentProducer,
    KafkaPublisher,
    RewindingConsumer,
    StateTable,
)
from worker.lifecycle import RequestLifecycle
from worker.metrics import WorkerMetrics
from worker.pipeline import HandlerSettings, RequestHandler
from worker.reply_check import ReplyChecker
from worker.retry import RetryPolicy, SharedBackoff
from worker.state import ConversationStore
from worker.topics import STATE_TABLE, faust_credentials
from worker.vapi.client import VapiClient, VapiTimeouts


@dataclass
class Assembly:
    """The assembled Faust app and the parts the runner and the tests reach."""

    app: faust.App
    handler: RequestHandler
    publisher: KafkaPublisher

    def vapi_auth_ok(self) -> bool:
        return self.handler.auth_ok

    def vapi_backoff_s(self) -> float:
        """Seconds left of the worker-wide pause after a 429 (0 when none)."""
        return self.handler.backoff_remaining_s()


def assemble(
    settings: Settings,
    metrics: WorkerMetrics,
    *,
    vapi_base_url: str,
    vapi_api_key: str,
) -> Assembly:
    """Create the Faust app and wire the request path (no I/O happens here)."""
    app = FaustApp(
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
        broker_credentials=faust_credentials(settings),
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
    fleet.on_limit(dispatcher.set_max_in_flight)
    follow_assignments(app, fleet, settings.topic_requests, settings.topic_partitions)
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

    return Assembly(app, handler, publisher)


def owned_partitions(app: faust.App, table: StateTable) -> set[int]:
    """The table's changelog partitions this worker actively owns; none while it rebalances or
    recovers."""
    if app.rebalancing or not cast(Any, app.tables).recovery.completed.is_set():
        return set()
    changelog = table.changelog_topic.get_topic_name()
    return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == changelog}
