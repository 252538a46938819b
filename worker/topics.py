"""Create the worker's topics when they are missing (the changelog topic is Faust's own)."""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError

from worker.config import Settings
from worker.errors import ConfigError

log = structlog.get_logger(__name__)


def topic_names(settings: Settings) -> list[str]:
    return [
        settings.topic_requests,
        settings.topic_deltas,
        settings.topic_responses,
        settings.topic_dlq,
    ]


async def ensure_topics(settings: Settings, *, timeout_s: float = 60.0) -> None:
    """Create any missing topic with ``topic_partitions`` partitions; existing ones are kept.

    The request topic's partition count must match the table's (Faust checks it at start); a
    mismatch on an existing topic is reported with a clear message instead of a Faust crash.
    """
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        client_id=f"{settings.worker_app_id}-admin",
        **kafka_client_kwargs(settings),
    )
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            await admin.start()
            break
        except KafkaConnectionError as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise ConfigError(
                    f"Kafka at {settings.kafka_bootstrap_servers} is not reachable: {exc}"
                ) from exc
            await asyncio.sleep(1.0)
    try:
        existing = set(await admin.list_topics())
        missing = [name for name in topic_names(settings) if name not in existing]
        if missing:
            # Another replica may create them at the same moment.
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(
                    [
                        NewTopic(
                            name,
                            num_partitions=settings.topic_partitions,
                            replication_factor=settings.topic_replication_factor,
                        )
                        for name in missing
                    ]
                )
            log.info("topics created", topics=missing, partitions=settings.topic_partitions)
        await _check_request_partitions(admin, settings)
    finally:
        await admin.close()


async def _check_request_partitions(admin: AIOKafkaAdminClient, settings: Settings) -> None:
    described = await admin.describe_topics([settings.topic_requests])
    partitions = len(described[0].get("partitions", [])) if described else 0
    if partitions and partitions != settings.topic_partitions:
        raise ConfigError(
            f"topic {settings.topic_requests!r} has {partitions} partitions but "
            f"TOPIC_PARTITIONS={settings.topic_partitions}; the chat-state table must have the "
            "same count: set TOPIC_PARTITIONS to match"
        )


def kafka_client_kwargs(settings: Settings) -> dict[str, object]:
    """aiokafka client arguments for SASL/TLS (empty for PLAINTEXT)."""
    protocol = settings.kafka_security_protocol
    kwargs: dict[str, object] = {"security_protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        kwargs["ssl_context"] = create_ssl_context(
            cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
        )
    if protocol.startswith("SASL"):
        kwargs["sasl_mechanism"] = settings.kafka_sasl_mechanism
        kwargs["sasl_plain_username"] = settings.kafka_sasl_username
        kwargs["sasl_plain_password"] = (
            settings.kafka_sasl_password.get_secret_value()
            if settings.kafka_sasl_password
            else None
        )
    return kwargs


class BrokerProbe:
    """Answers "is the broker reachable?" for /readyz, with one small admin request at a time.

    Every client it creates is closed by the probe itself once a check fails. aiokafka's own
    request timeout (``timeout_s``) bounds each step, because only aiokafka's timeout closes the
    connection a half-finished start opened: a start cancelled from outside leaves that connection
    to the garbage collector, one per check during an outage.
    """

    def __init__(self, settings: Settings, *, timeout_s: float = 5.0) -> None:
        self._settings = settings
        self._timeout_s = timeout_s
        self._admin: AIOKafkaAdminClient | None = None
        self.reachable = False

    async def check(self) -> bool:
        """Ask the cluster for its metadata; remember and return whether that worked."""
        try:
            if self._admin is None:
                # Held before it starts, so a failed start is closed below like any failure.
                self._admin = AIOKafkaAdminClient(
                    bootstrap_servers=self._settings.kafka_bootstrap_servers,
                    client_id=f"{self._settings.worker_app_id}-probe",
                    request_timeout_ms=int(self._timeout_s * 1000),
                    **kafka_client_kwargs(self._settings),
                )
                await asyncio.wait_for(self._admin.start(), self._start_bound_s())
            await asyncio.wait_for(self._admin.describe_cluster(), self._timeout_s)
            self.reachable = True
        except Exception:
            # Any failure means "not reachable now"; the next check starts a fresh client.
            self.reachable = False
            await self.close()
        return self.reachable

    def _start_bound_s(self) -> float:
        """A backstop above aiokafka's own bound on a start: connecting, the version handshake
        and the metadata request, each up to the request timeout, for every bootstrap server."""
        servers = len(self._settings.kafka_bootstrap_servers.split(","))
        return self._timeout_s * (3 * servers + 1)

    async def close(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            with contextlib.suppress(Exception):
                await admin.close()
