"""A real Kafka broker for the tests, and helpers to use it.

Where the broker comes from, first match wins:

1. ``KAFKA_BOOTSTRAP_SERVERS`` from the environment (a broker someone else runs);
2. a KRaft Kafka container via testcontainers, when a Docker engine answers a ping;
3. the local broker of ``scripts/local-kafka.sh`` (Kafka jars from Maven Central run with ``java``)
   on two free ports, stopped again at the end of the session.

When none works the requesting test fails (never skips): CI must not pass without a broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import subprocess
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import for_code

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCAL_KAFKA_SCRIPT = REPO_ROOT / "scripts" / "local-kafka.sh"
# The image testcontainers' KafkaContainer boot script is written for (Confluent's, KRaft >= 7.0).
KAFKA_IMAGE = os.environ.get("KAFKA_TEST_IMAGE", "confluentinc/cp-kafka:7.6.0")
DOCKER_PING_TIMEOUT_S = 2
CONTAINER_START_TIMEOUT_S = 120
# `up` waits up to 90 s for the broker; resolving the jars on a cold Maven cache adds ~30 s.
LOCAL_START_TIMEOUT_S = 300
LOCAL_START_ATTEMPTS = 3
REACHABLE_TIMEOUT_S = 10.0


class BrokerStartError(Exception):
    """A broker source was tried and did not give a usable broker."""


@contextlib.contextmanager
def kafka_broker() -> Iterator[str]:
    """Yield the bootstrap servers of a running broker; stop it afterwards if started here."""
    with contextlib.ExitStack() as cleanup:
        yield _start_broker(cleanup)


def _start_broker(cleanup: contextlib.ExitStack) -> str:
    configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if configured:
        unreachable = _unreachable(configured, REACHABLE_TIMEOUT_S)
        if unreachable:
            pytest.fail(f"KAFKA_BOOTSTRAP_SERVERS={configured}: {unreachable}", pytrace=False)
        return configured

    reasons: list[str] = []
    if docker_available():
        try:
            return _start_container(cleanup)
        except Exception as exc:
            # Any failure (image not pullable, slow start) falls through to the local broker.
            reasons.append(f"Kafka container ({KAFKA_IMAGE}) did not start: {exc!r}")
    else:
        reasons.append("no Docker engine answered")
    try:
        return _start_local(cleanup)
    except BrokerStartError as exc:
        reasons.append(f"local broker (scripts/local-kafka.sh) did not start:\n{exc}")
    pytest.fail("no Kafka broker for the tests:\n- " + "\n- ".join(reasons), pytrace=False)


def docker_available() -> bool:
    """Tell whether a Docker engine answers a ping within a short timeout."""
    try:
        # Imported here: only this path needs it. The package ships no type hints.
        import docker  # type: ignore[import-untyped]

        client = docker.from_env(timeout=DOCKER_PING_TIMEOUT_S)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # no engine, no socket, no package: all mean "no Docker"
        return False


def _start_container(cleanup: contextlib.ExitStack) -> str:
    from testcontainers.community.kafka import KafkaContainer  # imported here: Docker path only

    container = KafkaContainer(KAFKA_IMAGE).with_kraft()
    cleanup.callback(container.stop)
    container.start(timeout=CONTAINER_START_TIMEOUT_S)
    return str(container.get_bootstrap_server())


def _start_local(cleanup: contextlib.ExitStack) -> str:
    failure = ""
    for _ in range(LOCAL_START_ATTEMPTS):
        port, controller_port = free_ports(2)
        env = {
            **os.environ,
            "LOCAL_KAFKA_PORT": str(port),
            "LOCAL_KAFKA_CONTROLLER_PORT": str(controller_port),
        }
        # Registered before `up`, so a start interrupted half-way (timeout, Ctrl-C) is cleaned too.
        cleanup.callback(_run_local_kafka, "down", env)
        result = _run_local_kafka("up", env)
        if result.returncode == 0:
            return result.stdout.strip().splitlines()[-1]
        failure = _tail(result.stderr, 60)
        if "already in use" not in result.stderr:
            break  # only a port taken between picking and binding is worth another try
    raise BrokerStartError(failure)


def _run_local_kafka(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["bash", str(LOCAL_KAFKA_SCRIPT), command],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=LOCAL_START_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BrokerStartError(f"scripts/local-kafka.sh {command}: {exc!r}") from exc


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def _unreachable(bootstrap: str, timeout_s: float) -> str:
    """Return why the first bootstrap server takes no TCP connection, or "" once it does."""
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=2):
                return ""
        except (OSError, ValueError) as exc:
            if time.monotonic() >= deadline:
                return f"no TCP connection within {timeout_s:.0f}s: {exc}"
        time.sleep(0.2)


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def unique_suffix(test_name: str) -> str:
    """Return a suffix for topic and group names: the test name (topic-safe) and 8 hex digits."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", test_name).strip("-.")[:40]
    return f"{safe}-{uuid.uuid4().hex[:8]}"


async def create_topics(
    bootstrap: str,
    names: Iterable[str],
    partitions: int = 1,
    *,
    replication_factor: int = 1,
    timeout_s: float = 30.0,
) -> None:
    """Create the topics and wait until every partition has a leader; raise on any broker error."""
    wanted = list(names)
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000)
    )
    await admin.start()
    try:
        response = await admin.create_topics(
            [NewTopic(name, partitions, replication_factor) for name in wanted],
            timeout_ms=int(timeout_s * 1000),
        )
        for topic, error_code, *rest in response.topic_errors:
            if error_code:
                message = rest[0] if rest else ""
                raise for_code(error_code)(f"creating topic {topic!r}: {message}")
        await _wait_for_leaders(admin, wanted, timeout_s)
    finally:
        await admin.close()


async def delete_topics(bootstrap: str, names: Iterable[str]) -> None:
    """Delete the topics; raise on any broker error (an unknown topic included)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        response = await admin.delete_topics(list(names))
        for topic, error_code, *rest in response.topic_error_codes:
            if error_code:
                message = rest[0] if rest else ""
                raise for_code(error_code)(f"deleting topic {topic!r}: {message}")
    finally:
        await admin.close()


async def _wait_for_leaders(admin: AIOKafkaAdminClient, names: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        described = await admin.describe_topics(names)
        if all(
            topic["error_code"] == 0
            and topic["partitions"]
            and all(p["leader"] >= 0 for p in topic["partitions"])
            for topic in described
        ):
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"topics {names} have no leader after {timeout_s:.0f}s: {described}")
        await asyncio.sleep(0.1)
