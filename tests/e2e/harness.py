"""Real processes for end-to-end tests: the simulator, worker processes, a producer, a consumer.

Everything here talks to the real broker and real HTTP; nothing is mocked. Each test gets its own
topics and consumer group (``Topics.unique``) so tests never see each other's records.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.partitioner import murmur2
from aiokafka.structs import RecordMetadata

from tests.kafka_fixture import LOCAL_KAFKA_SCRIPT, create_topics, delete_topics, free_ports

ROOT = Path(__file__).resolve().parents[2]
SIM_KEY = "sim-test-key-0123456789"
#: Faust's group settings (read from the environment): a SIGKILLed member is evicted after 6 s
#: (the broker's minimum) instead of Faust's default 60 s, so a restarted worker gets its
#: partitions soon.
GROUP_ENV = {"BROKER_SESSION_TIMEOUT": "6", "BROKER_HEARTBEAT_INTERVAL": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Topics:
    """Names of one test's topics and consumer group."""

    requests: str
    deltas: str
    responses: str
    dlq: str
    app_id: str

    @classmethod
    def unique(cls, suffix: str) -> Topics:
        return cls(
            requests=f"req-{suffix}",
            deltas=f"delta-{suffix}",
            responses=f"resp-{suffix}",
            dlq=f"dlq-{suffix}",
            app_id=f"app-{suffix}",
        )

    def changelog(self, table: str = "chat-state") -> str:
        """The changelog topic Faust keeps for ``table``."""
        return f"{self.app_id}-{table}-changelog"

    def env(self) -> dict[str, str]:
        return {
            "TOPIC_REQUESTS": self.requests,
            "TOPIC_DELTAS": self.deltas,
            "TOPIC_RESPONSES": self.responses,
            "TOPIC_DLQ": self.dlq,
            "WORKER_APP_ID": self.app_id,
        }


def stop_process(proc: subprocess.Popen[Any] | None, grace_s: float) -> None:
    """SIGTERM ``proc`` if it still runs; SIGKILL it if it has not exited within ``grace_s``."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class SimulatorProcess:
    """``vapi-worker simulator`` in its own process, as a real Vapi stand-in.

    ``api_key`` is the one Bearer key it accepts (the workers' default is ``SIM_KEY``).
    """

    def __init__(self, *args: str, api_key: str = SIM_KEY) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self._args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SimulatorProcess:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker",
                "simulator",
                "--port",
                str(self.port),
                "--api-key",
                self.api_key,
                *self._args,
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200:
                    return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"simulator exited with {self.proc.returncode}")
            time.sleep(0.1)
        raise RuntimeError("simulator did not answer /healthz within 20 s")

    def calls(self) -> list[dict[str, Any]]:
        calls: list[dict[str, Any]] = httpx.get(f"{self.base_url}/_sim/calls", timeout=10).json()
        return calls

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = httpx.get(f"{self.base_url}/_sim/stats", timeout=10).json()
        return stats

    def stop(self) -> None:
        stop_process(self.proc, 10)


class WorkerProcess:
    """``vapi-worker run`` in its own process; its log goes to a file the test can print."""

    def __init__(
        self,
        bootstrap: str,
        topics: Topics,
        simulator: SimulatorProcess,
        log_dir: Path,
        name: str = "worker",
        **overrides: str,
    ) -> None:
        self.http_port = free_port()
        self.log_path = log_dir / f"{name}-{self.http_port}.log"
        self.env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "VAPI_BASE_URL": simulator.base_url,
            "VAPI_API_KEY": SIM_KEY,
            "VAPI_ASSISTANT_ID": "sim-assistant",
            "TOPIC_PARTITIONS": "4",
            "WORKER_HTTP_PORT": str(self.http_port),
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "INFO",
            "RETRY_BASE_DELAY_S": "0.05",
            "RETRY_MAX_DELAY_S": "0.5",
            **topics.env(),
            **overrides,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "run"],
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        return self

    def wait_ready(self, timeout_s: float = 60) -> None:
        """Wait for /readyz to say the worker is up, assigned and recovered."""
        deadline = time.monotonic() + timeout_s
        url = f"http://127.0.0.1:{self.http_port}/readyz"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready within {timeout_s} s:\n{self.log_tail()}")

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5).text

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (a killed process loses what it had buffered)."""
        records: list[dict[str, Any]] = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            start = line.find("{")  # a terminal escape may precede the first record
            if start >= 0:
                with contextlib.suppress(ValueError):
                    records.append(json.loads(line[start:]))
        return records

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def terminate(self, timeout_s: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


class Workers:
    """Worker processes of one test: started with common settings (``GROUP_ENV`` first), all
    stopped at the end (the ``workers`` fixture)."""

    def __init__(
        self, bootstrap: str, topics: Topics, sim: SimulatorProcess, log_dir: Path, **env: str
    ) -> None:
        self._bootstrap, self._topics, self._sim, self._log_dir = bootstrap, topics, sim, log_dir
        self._env = {**GROUP_ENV, **env}
        self.started: list[WorkerProcess] = []

    def start(self, name: str, **env: str) -> WorkerProcess:
        worker = WorkerProcess(
            self._bootstrap, self._topics, self._sim, self._log_dir, name, **{**self._env, **env}
        ).start()
        self.started.append(worker)
        return worker

    async def start_ready(self, name: str, **env: str) -> WorkerProcess:
        worker = self.start(name, **env)
        await asyncio.to_thread(worker.wait_ready, 120)
        return worker

    def stop_all(self) -> None:
        for worker in self.started:
            if worker.proc is not None and worker.proc.poll() is None:
                worker.kill()


class UnwritableTopic:
    """A topic deleted under a running worker, so that every write to it is retried for good.

    In its place stands a topic whose name collides with it (Kafka treats ``.`` and ``_`` alike),
    so the broker cannot create it again when a client asks for it (auto-creation is on). A
    producer that knew the topic keeps its records and retries them (UnknownTopicOrPartition is
    retriable, and an idempotent producer never expires a batch); one that did not waits for the
    topic's metadata. No client may read the topic while it is gone: a metadata request between
    the deletion and the stand-in would create it again.
    """

    def __init__(self, bootstrap: str, topic: str, partitions: int = 4) -> None:
        self.bootstrap, self.topic, self.partitions = bootstrap, topic, partitions
        self.stand_in = topic.replace("_", ".")
        assert self.stand_in != topic, "the topic name needs a '_' to collide with"

    async def break_it(self) -> None:
        await delete_topics(self.bootstrap, [self.topic])
        await self._create(self.stand_in, 1)

    async def fix_it(self) -> None:
        """The topic again, empty, with its partitions.

        A client waiting for it may create it first (with the broker's one partition): then it
        gets the rest.
        """
        await delete_topics(self.bootstrap, [self.stand_in])
        try:
            await self._create(self.topic, self.partitions)
        except TopicAlreadyExistsError:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
            await admin.start()
            try:
                (described,) = await admin.describe_topics([self.topic])
                if len(described["partitions"]) < self.partitions:
                    await admin.create_partitions({self.topic: NewPartitions(self.partitions)})
            finally:
                await admin.close()

    async def _create(self, name: str, partitions: int) -> None:
        # A deletion takes a moment: until it is done, the new name still collides.
        deadline = time.monotonic() + 30
        while True:
            try:
                await create_topics(self.bootstrap, [name], partitions)
                return
            except TopicAlreadyExistsError:
                raise
            except KafkaError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)


async def topic_partitions(
    consumer: AIOKafkaConsumer, topic: str, *, timeout_s: float = 20.0
) -> list[TopicPartition]:
    """Every partition of ``topic``, once the consumer's metadata knows it (the tests' own
    reading, independent of the client distribution the worker's users read with)."""
    for _ in range(max(1, int(timeout_s / 0.2))):
        found = consumer.partitions_for_topic(topic)
        if found:
            return [TopicPartition(topic, p) for p in sorted(found)]
        await consumer._client.force_metadata_update()  # no public refresh
        await asyncio.sleep(0.2)
    raise AssertionError(f"topic {topic!r} does not exist")


async def assign_all(
    consumer: AIOKafkaConsumer, topics: list[str], *, from_beginning: bool
) -> list[TopicPartition]:
    """Assign every partition of ``topics``, positioned at their beginning (or end) now."""
    partitions: list[TopicPartition] = []
    for topic in topics:
        partitions += await topic_partitions(consumer, topic)
    consumer.assign(partitions)
    if from_beginning:
        await consumer.seek_to_beginning(*partitions)
    else:
        await consumer.seek_to_end(*partitions)
    for tp in partitions:
        await consumer.position(tp)
    return partitions


async def produce(
    bootstrap: str,
    topic: str,
    records: Iterable[tuple[bytes | None, bytes]],
    headers: list[tuple[str, bytes]] | None = None,
) -> list[RecordMetadata]:
    """Produce records in the given order (one producer: per-partition order is kept).

    Returns each record's metadata (partition, offset), in the order given.
    """
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        futures = [
            await producer.send(topic, value, key=key, headers=headers) for key, value in records
        ]
        return list(await asyncio.gather(*futures))
    finally:
        await producer.stop()


async def read_topic(bootstrap: str, topic: str, timeout_s: float = 30) -> list[ConsumerRecord]:
    """Every record of ``topic``, from the beginning up to its end offsets when called."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        partitions = await topic_partitions(consumer, topic)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        records: list[ConsumerRecord] = []
        deadline = time.monotonic() + timeout_s
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read {topic} to its end within {timeout_s} s")
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records += batch
        return records
    finally:
        await consumer.stop()


async def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """The consumer group's committed offsets on ``topic``, by partition (absent: none yet)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic}


async def wait_committed_past(
    bootstrap: str, topics: Topics, offsets: Mapping[int, int], timeout_s: float = 60
) -> None:
    """Wait until the test's group committed past ``offsets`` ({partition: offset}) on the
    request topic: each of those records is done."""
    deadline = time.monotonic() + timeout_s
    while True:
        committed = await committed_offsets(bootstrap, topics.app_id, topics.requests)
        if all(committed.get(p, 0) > offset for p, offset in offsets.items()):
            return
        assert time.monotonic() < deadline, f"not committed past {dict(offsets)}: {committed}"
        await asyncio.sleep(0.2)


async def fill_changelog(
    bootstrap: str, topics: Topics, partitions: int, conversations: int
) -> None:
    """The changelog as a worker would have left it: one value per conversation, created as
    Faust creates it, each on its conversation's partition."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        compact = {"cleanup.policy": "compact"}
        await admin.create_topics(
            [NewTopic(topics.changelog(), partitions, 1, topic_configs=compact)]
        )
    finally:
        await admin.close()
    now_ms = round(time.time() * 1000)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20)
    await producer.start()
    try:
        sent = []
        for n in range(conversations):
            conversation = f"conv-{n}"
            partition = (murmur2(conversation.encode()) & 0x7FFFFFFF) % partitions
            value = {"chat_id": f"chat_{os.urandom(8).hex()}", "last_active_ms": now_ms}
            sent.append(
                await producer.send(
                    topics.changelog(),
                    json.dumps(value).encode(),
                    key=json.dumps(conversation).encode(),
                    partition=partition,
                )
            )
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format to ``{'name{labels}': value}``, samples spelled as exposed."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def paced(text: str, tokens: int, delay_ms: int, first_ms: int = 20, extra: str = "") -> str:
    """``text`` with a simulator pacing directive (and any further directive) in front."""
    return f"[[sim:pace tokens={tokens} delay_ms={delay_ms} first_ms={first_ms}]]{extra} {text}"


def request_record(
    conversation: str, request_id: str, text: str, **extra: Any
) -> tuple[bytes, bytes]:
    body = {"request_id": request_id, "conversation_id": conversation, "input": text, **extra}
    return conversation.encode(), json.dumps(body).encode()


@dataclass
class Outputs:
    """Everything the worker published, as a downstream consumer reads it."""

    deltas: list[dict[str, Any]] = field(default_factory=list)
    responses: list[dict[str, Any]] = field(default_factory=list)
    dlq: list[Any] = field(default_factory=list)
    delta_partitions: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))

    def responses_by_request(self) -> dict[str, list[dict[str, Any]]]:
        found: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for response in self.responses:
            found[response["request_id"]].append(response)
        return found

    def deltas_of(self, request_id: str, attempt: int | None = None) -> list[dict[str, Any]]:
        return [
            d
            for d in self.deltas
            if d["request_id"] == request_id and (attempt is None or d["attempt"] == attempt)
        ]


class OutputReader:
    """Consumes the output topics from the beginning into ``Outputs`` in the background."""

    def __init__(self, bootstrap: str, topics: Topics) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.outputs = Outputs()
        self.records: list[Any] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> OutputReader:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await self._consumer.start()
        names = [self.topics.deltas, self.topics.responses, self.topics.dlq]
        await assign_all(self._consumer, names, from_beginning=True)
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._consumer.stop()

    async def _run(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=100)
            for tp, records in batch.items():
                for record in records:
                    self.records.append(record)
                    if tp.topic == self.topics.deltas:
                        value = json.loads(record.value)
                        self.outputs.deltas.append(value)
                        self.outputs.delta_partitions[value["conversation_id"]].add(tp.partition)
                    elif tp.topic == self.topics.responses:
                        self.outputs.responses.append(json.loads(record.value))
                    else:
                        self.outputs.dlq.append(record)

    async def wait_for(self, condition: Any, timeout_s: float = 60, what: str = "") -> None:
        deadline = time.monotonic() + timeout_s
        while not condition(self.outputs):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout_s} s waiting for {what}: "
                    f"{len(self.outputs.responses)} responses, {len(self.outputs.dlq)} dlq"
                )
            await asyncio.sleep(0.1)

    async def wait_for_responses(self, request_ids: Iterable[str], timeout_s: float = 60) -> None:
        wanted = set(request_ids)
        await self.wait_for(
            lambda out: wanted <= {r["request_id"] for r in out.responses},
            timeout_s,
            what=f"responses to {sorted(wanted)}",
        )


def chains_by_conversation(calls: list[dict[str, Any]]) -> Mapping[str, list[dict[str, Any]]]:
    """Group successful simulator calls by the conversation prefix of their request id."""
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for call in calls:
        if call.get("outcome") == "completed" and call.get("request_id"):
            grouped[call["request_id"].rsplit("-", 1)[0]].append(call)
    return grouped


def calls_by_request(sim: SimulatorProcess) -> dict[str, list[dict[str, Any]]]:
    """The simulator's calls so far, by request id, in the order they started."""
    found: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for call in sorted(sim.calls(), key=lambda c: c["started_at"]):
        found[call["request_id"]].append(call)
    return found


async def wait_until(
    condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.1
) -> None:
    """Poll ``condition`` (it may block briefly) until true; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(condition):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(poll_s)


class LocalBroker:
    """A broker of its own from ``scripts/local-kafka.sh`` that a test may stop and resume."""

    def __init__(self) -> None:
        port, controller = free_ports(2)
        self.env = {
            **os.environ,
            "LOCAL_KAFKA_PORT": str(port),
            "LOCAL_KAFKA_CONTROLLER_PORT": str(controller),
        }
        self._up: subprocess.Popen[str] | None = None

    def begin_up(self) -> None:
        """Start ``up`` in the background (a JVM start takes a while)."""
        self._up = subprocess.Popen(
            ["bash", str(LOCAL_KAFKA_SCRIPT), "up"],
            env=self.env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def bootstrap(self, timeout_s: float = 300) -> str:
        """Wait for ``up`` to finish; the bootstrap address."""
        assert self._up is not None
        out, err = self._up.communicate(timeout=timeout_s)
        if self._up.returncode != 0:
            pytest.fail(f"dedicated broker did not start:\n{err[-3000:]}")
        return out.strip().splitlines()[-1]

    def run(self, command: str, timeout_s: float = 300) -> None:
        result = subprocess.run(
            ["bash", str(LOCAL_KAFKA_SCRIPT), command],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        assert result.returncode == 0, f"local-kafka.sh {command}:\n{result.stderr[-3000:]}"

    def pid(self) -> int:
        """The broker JVM's process id (from the pid file ``local-kafka.sh up`` wrote)."""
        port = self.env["LOCAL_KAFKA_PORT"]
        return int((ROOT / ".run" / f"kafka-{port}" / "kafka.pid").read_text().strip())

    def freeze(self) -> None:
        """Stop the broker process (SIGSTOP): connections stay open, nothing is answered."""
        os.kill(self.pid(), signal.SIGSTOP)

    def thaw(self) -> None:
        """Let a frozen broker run again (SIGCONT; harmless when it is not frozen)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid(), signal.SIGCONT)
