"""Kafka's record size limits, end to end: no reply, delta or dead letter can crash the worker.

Real broker, simulator process, worker process. The producer refuses records over its
``max_request_size`` (Faust's default, 1,000,000 bytes) and the broker refuses batches over
``message.max.bytes``; before these limits were handled, each case below raised on every attempt
and the worker crashed, restarted, called Vapi again and crashed again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from tests.e2e.harness import (
    OutputReader,
    Outputs,
    SimulatorProcess,
    Topics,
    WorkerProcess,
    produce,
    request_record,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

#: Faust's ``producer_max_request_size``: the largest record the worker's producer may send.
PRODUCER_LIMIT = 1_000_000
DEFAULT_MAX_REPLY_CHARS = 100_000
PARTITIONS = 4


@pytest.fixture
def simulator() -> Iterator[SimulatorProcess]:
    sim = SimulatorProcess("--first-token-latency-s", "0", "--inter-token-delay-s", "0").start()
    yield sim
    sim.stop()


async def wait_alive(
    reader: OutputReader,
    worker: WorkerProcess,
    condition: Callable[[Outputs], bool],
    what: str,
    timeout_s: float = 90,
) -> None:
    """Wait for ``condition``; fail at once, with the worker's log, if the worker exits."""
    deadline = time.monotonic() + timeout_s
    while not condition(reader.outputs):
        assert worker.proc is not None
        if worker.proc.poll() is not None:
            raise AssertionError(
                f"the worker exited ({worker.proc.returncode}) before {what}:\n"
                + worker.log_tail(30)
            )
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{worker.log_tail(30)}"
        await asyncio.sleep(0.1)


def answered(*request_ids: str) -> Callable[[Outputs], bool]:
    return lambda out: set(request_ids) <= {r["request_id"] for r in out.responses}


def only_response(outputs: Outputs, request_id: str) -> dict[str, Any]:
    [response] = outputs.responses_by_request()[request_id]
    return response


def record_size(record: Any) -> int:
    """What the producer's size check computes for a consumed record."""
    headers = list(record.headers)
    return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(record.key, record.value, headers))


async def test_a_reply_over_max_reply_chars_fails_with_reply_too_large_and_the_worker_goes_on(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, tmp_path: Path
) -> None:
    """A 1.2 MB reply ends at MAX_REPLY_CHARS as ``failed``/``reply_too_large``, Vapi called once.

    The deltas published before the limit stay; the call is closed there (the simulator sees the
    client go away long before its last token); the next request of the conversation completes.
    """
    worker = WorkerProcess(kafka_bootstrap, topics, simulator, tmp_path).start()
    try:
        worker.wait_ready()
        # 20 tokens of 60,000 characters, 0.2 s apart: 1.2 million characters in 4 s.
        long_reply = "[[sim:pace first_ms=0 delay_ms=200 tokens=20 token_chars=60000]] go"
        records = [
            request_record("conv-long", "long-1", long_reply),
            request_record("conv-long", "after-2", "Hello again"),
        ]
        async with OutputReader(kafka_bootstrap, topics) as reader:
            await produce(kafka_bootstrap, topics.requests, records)
            await wait_alive(reader, worker, answered("long-1", "after-2"), "both responses")
            await asyncio.sleep(1)  # a second response would show up by now
            outputs = reader.outputs

            failed = only_response(outputs, "long-1")
            assert failed["status"] == "failed", failed
            assert failed["error"]["code"] == "reply_too_large", failed
            assert failed["error"]["retryable"] is False
            assert failed["error"]["http_status"] is None
            assert failed["text"] == ""
            deltas = outputs.deltas_of("long-1")
            assert [d["seq"] for d in deltas] == list(range(len(deltas)))
            streamed = "".join(d["delta"] for d in deltas)
            assert streamed == ("x" * 59_999 + " ") * (DEFAULT_MAX_REPLY_CHARS // 60_000)

            after = only_response(outputs, "after-2")
            assert after["status"] == "completed", after
            # The failed turn's chat is not the conversation's context.
            assert after["previous_chat_id"] is None

            [call] = [c for c in simulator.calls() if c["request_id"] == "long-1"]
            assert call["outcome"] == "client_closed", call
            assert call["deltas_sent"] < 20
            assert worker.proc is not None
            assert worker.proc.poll() is None
    finally:
        worker.terminate()


async def test_a_delta_larger_than_a_record_may_hold_is_split_and_nothing_fails_the_batch(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, tmp_path: Path
) -> None:
    """A huge SSE event goes out as several deltas, each a record the broker takes.

    90,000 euro signs (270 kB) and a whole 1 MiB event of them (3 MB) are both split, with
    consecutive ``seq`` and not one character lost or cut; the first completes, the second's
    final response could not be a record, so it fails with ``reply_too_large`` and the worker
    goes on. Both run on a conversation whose delta partition is already known (the path that
    skips the producer's own size check).
    """
    worker = WorkerProcess(
        kafka_bootstrap, topics, simulator, tmp_path, MAX_REPLY_CHARS="1048576"
    ).start()
    try:
        worker.wait_ready()
        pace = "first_ms=0 delay_ms=0 tokens=1 char=\u20ac"
        records = [
            request_record("conv-huge", "warm-1", "Hello"),
            request_record("conv-huge", "big-2", f"[[sim:pace {pace} token_chars=90000]] go"),
            request_record("conv-huge", "huge-3", f"[[sim:pace {pace} token_chars=1000000]] go"),
            request_record("conv-huge", "after-4", "Hello again"),
        ]
        async with OutputReader(kafka_bootstrap, topics) as reader:
            await produce(kafka_bootstrap, topics.requests, records)
            await wait_alive(
                reader, worker, answered("warm-1", "big-2", "huge-3", "after-4"), "4 responses"
            )
            outputs = reader.outputs

            for request_id, chars in (("big-2", 90_000), ("huge-3", 1_000_000)):
                deltas = outputs.deltas_of(request_id)
                assert len(deltas) > 1, request_id
                assert [d["seq"] for d in deltas] == list(range(len(deltas)))
                assert {d["attempt"] for d in deltas} == {1}
                assert "".join(d["delta"] for d in deltas) == "\u20ac" * (chars - 1) + " "

            big = only_response(outputs, "big-2")
            assert big["status"] == "completed", big
            assert big["delta_count"] == len(outputs.deltas_of("big-2"))
            assert big["text"] == "\u20ac" * 89_999 + " "
            huge = only_response(outputs, "huge-3")
            assert huge["status"] == "failed", huge
            assert huge["error"]["code"] == "reply_too_large", huge
            assert only_response(outputs, "after-4")["status"] == "completed"

            sizes = [record_size(r) for r in reader.records if r.topic == topics.deltas]
            assert max(sizes) <= PRODUCER_LIMIT
            assert worker.proc is not None
            assert worker.proc.poll() is None
    finally:
        worker.terminate()


async def test_a_dead_letter_over_the_producer_limit_is_truncated_with_a_header(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, tmp_path: Path
) -> None:
    """A 1.2 MB bad record (the request topic allows 2 MB) is dead-lettered cut to fit.

    It keeps its key and headers, the leading bytes of its value, the usual ``dlq-*`` headers and
    ``dlq-truncated`` (the original value's size); the next request is answered.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(
                    topics.requests,
                    PARTITIONS,
                    1,
                    topic_configs={"max.message.bytes": "2000000"},
                )
            ]
        )
    finally:
        await admin.close()
    worker = WorkerProcess(kafka_bootstrap, topics, simulator, tmp_path).start()
    try:
        worker.wait_ready()
        key, value = request_record("conv-dlq", "big-1", "y" * 1_200_000)
        headers = [("x-case", b"too big"), ("traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16)]
        async with OutputReader(kafka_bootstrap, topics) as reader:
            producer = AIOKafkaProducer(
                bootstrap_servers=kafka_bootstrap, max_request_size=3_000_000
            )
            await producer.start()
            try:
                sent = await (await producer.send(topics.requests, value, key=key, headers=headers))
            finally:
                await producer.stop()
            await produce(
                kafka_bootstrap,
                topics.requests,
                [request_record("conv-dlq", "after-2", "Hello after the big one")],
            )
            await wait_alive(
                reader,
                worker,
                lambda out: len(out.dlq) >= 1 and answered("after-2")(out),
                "the dead letter and the next response",
            )
            await asyncio.sleep(1)  # a second dead letter would show up by now

            [dead] = reader.outputs.dlq
            assert dead.key == key
            assert 0 < len(dead.value) < len(value)
            assert value.startswith(dead.value)
            assert record_size(dead) <= PRODUCER_LIMIT
            dead_headers = list(dead.headers)
            assert dead_headers[: len(headers)] == headers
            added = dict(dead_headers[len(headers) :])
            assert added["dlq-reason"] == b"input_too_large"
            assert added["dlq-source-topic"] == topics.requests.encode()
            assert int(added["dlq-source-partition"]) == sent.partition
            assert int(added["dlq-source-offset"]) == sent.offset
            assert int(added["dlq-truncated"]) == len(value)

            assert only_response(reader.outputs, "after-2")["status"] == "completed"
            assert worker.proc is not None
            assert worker.proc.poll() is None
    finally:
        worker.terminate()
