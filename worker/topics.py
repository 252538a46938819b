"""The worker's topics: which to create and with how many partitions, and creating them.

The request topic's partition count is the one that matters: the ``chat-state`` table has one
partition per request partition, kept in the changelog topic that Faust creates,
``<WORKER_APP_ID>-chat-state-changelog``. An existing request topic keeps its count, whatever
``TOPIC_PARTITIONS`` says; only an existing changelog with another count stops the worker, since
each conversation's state would then be read from a partition its requests no longer come from.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from ssl import SSLContext
from typing import Any, cast

import structlog
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError

from worker.config import Settings
from worker.errors import ConfigError

log = structlog.get_logger(__name__)

#: The name of the conversation-state table; Faust names its changelog after it.
STATE_TABLE = "chat-state"


def topic_names(settings: Settings) -> list[str]:
    return [
        settings.topic_requests,
        settings.topic_deltas,
        settings.topic_responses,
        settings.topic_dlq,
    ]


def changelog_topic(settings: Settings) -> str:
    """The ``chat-state`` table's changelog topic, as Faust names it."""
    return f"{settings.worker_app_id}-{STATE_TABLE}-changelog"


@dataclass(frozen=True)
class TopicPlan:
    """The partition count for the request topic's table, and the topics to create with it."""

    partitions: int
    create: tuple[str, ...]


def plan_topics(settings: Settings, existing: Mapping[str, int]) -> TopicPlan:
    """Decide from ``existing`` (partition counts of the topics that exist) what to create.

    The count is the request topic's if it exists, else ``TOPIC_PARTITIONS``; every missing
    topic of the worker's is created with it. Raises ``ConfigError`` when the changelog exists
    with another count.
    """
    requests = settings.topic_requests
    partitions = existing.get(requests, settings.topic_partitions)
    changelog = changelog_topic(settings)
    found = existing.get(changelog)
    if found is not None and found != partitions:
        request_count = (
            f"has {partitions}"
            if requests in existing
            else f"would be created with TOPIC_PARTITIONS={partitions}"
        )
        raise ConfigError(
            f"the changelog topic {changelog!r} has {found} partitions but the request topic "
            f"{requests!r} {request_count}: each conversation's state must stay in the partition "
            f"its requests come from. Use a request topic of {found} partitions, or delete "
            f"{changelog!r} while no worker runs (every conversation then starts a new Vapi chat)"
        )
    create = tuple(name for name in topic_names(settings) if name not in existing)
    return TopicPlan(partitions, create)


async def ensure_topics(settings: Settings, *, timeout_s: float = 60.0) -> int:
    """Create the missing topics (see ``plan_topics``); return the request topic's count.

    The table must be built with the returned count, not ``TOPIC_PARTITIONS``.
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
        plan = plan_topics(settings, await _existing_counts(admin, settings, deadline))
        if plan.create:
            await _create(admin, settings, plan)
            # Another replica may have created the request topic first, with another count.
            plan = plan_topics(settings, await _existing_counts(admin, settings, deadline))
        if plan.partitions != settings.topic_partitions:
            log.info(
                "the request topic's partition count is used, not TOPIC_PARTITIONS",
                topic=settings.topic_requests,
                partitions=plan.partitions,
                topic_partitions=settings.topic_partitions,
            )
        return plan.partitions
    finally:
        await admin.close()


async def _existing_counts(
    admin: AIOKafkaAdminClient, settings: Settings, deadline: float
) -> dict[str, int]:
    """Partition counts of the worker's topics and changelog that exist."""
    wanted = {*topic_names(settings), changelog_topic(settings)}
    names = sorted(wanted & set(await admin.list_topics()))
    while True:
        # Only topics known to exist are described: describing a missing one could make a
        # cluster that auto-creates topics create it.
        described = await admin.describe_topics(names) if names else []
        counts = {topic["topic"]: len(topic.get("partitions") or ()) for topic in described}
        if all(counts.get(name) for name in names):
            return counts
        # A topic created a moment ago may not have its partitions in the metadata yet.
        if asyncio.get_running_loop().time() > deadline:
            raise ConfigError(f"no partition metadata for topics {names} from Kafka")
        await asyncio.sleep(0.5)


async def _create(admin: AIOKafkaAdminClient, settings: Settings, plan: TopicPlan) -> None:
    response = await admin.create_topics(
        [
            NewTopic(
                name,
                num_partitions=plan.partitions,
                replication_factor=settings.topic_replication_factor,
            )
            for name in plan.create
        ]
    )
    for topic, code, *rest in response.topic_errors:
        # Another replica may create the same topics at the same moment.
        if code and code != TopicAlreadyExistsError.errno:
            message = rest[0] if rest else ""
            raise ConfigError(f"cannot create topic {topic!r}: error {code} {message}".strip())
    log.info("topics created", topics=list(plan.create), partitions=plan.partitions)


def kafka_client_kwargs(settings: Settings) -> dict[str, object]:
    """aiokafka client arguments for SASL/TLS (only ``security_protocol`` for PLAINTEXT)."""
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


def faust_credentials(settings: Settings) -> Any:
    """The same credentials as Faust's ``broker_credentials``: None for PLAINTEXT, the SSL
    context for SSL, ``SASLCredentials`` for SASL (read from :func:`kafka_client_kwargs`)."""
    kwargs = kafka_client_kwargs(settings)
    protocol = kwargs["security_protocol"]
    if protocol == "PLAINTEXT":
        return None
    ssl_context = kwargs.get("ssl_context")
    if protocol == "SSL":
        return ssl_context
    import faust

    return faust.SASLCredentials(
        username=str(kwargs["sasl_plain_username"] or ""),
        password=str(kwargs["sasl_plain_password"] or ""),
        ssl_context=cast(SSLContext | None, ssl_context),
        mechanism=str(kwargs["sasl_mechanism"]),
    )


class BrokerProbe:
    """Answers "is the broker reachable?" for the ops endpoints' dependencies, with one small
    admin request at a time.

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
