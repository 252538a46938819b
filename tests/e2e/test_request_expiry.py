"""Expiry: a request that would start too late ends ``expired``, with no Vapi call.

Real broker, simulator and worker. A request past its own ``expires_at``, and one whose record is
older than ``WORKER_REQUEST_MAX_AGE_S`` (a backlog after an outage), are answered ``expired``
without a call; the conversation's state is not touched, so its next turn continues from the
last reply; a malformed ``expires_at`` goes to the dead-letter topic.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from tests.e2e.harness import (
    OutputReader,
    SimulatorProcess,
    Topics,
    WorkerProcess,
    parse_metrics,
    produce,
    request_record,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

SIM_ARGS = ("--first-token-latency-s", "0.02", "--inter-token-delay-s", "0.005")


async def _produce_dated(
    bootstrap: str, topic: str, records: list[tuple[bytes, bytes, int]]
) -> None:
    """Records with the given timestamps (ms), in order."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        for key, value, timestamp_ms in records:
            await (await producer.send(topic, value, key=key, timestamp_ms=timestamp_ms))
    finally:
        await producer.stop()


async def test_requests_too_old_to_start_expire_without_a_vapi_call(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, tmp_path: Path
) -> None:
    worker = WorkerProcess(
        kafka_bootstrap, topics, simulator, tmp_path, WORKER_REQUEST_MAX_AGE_S="60"
    ).start()
    try:
        await asyncio.to_thread(worker.wait_ready)
        async with OutputReader(kafka_bootstrap, topics) as reader:
            await produce(
                kafka_bootstrap, topics.requests, [request_record("c-x", "x-1", "my name is Ann")]
            )
            await reader.wait_for_responses(["x-1"], 60)
            now = datetime.now(UTC)
            ago = (now - timedelta(minutes=5)).astimezone(timezone(timedelta(hours=5, minutes=30)))
            await produce(
                kafka_bootstrap,
                topics.requests,
                [
                    request_record("c-x", "x-2", "hello?", expires_at=ago.isoformat()),
                    request_record("c-x", "x-3", "What's my name?"),
                    request_record(
                        "c-soon", "soon-1", "hi", expires_at=(now + timedelta(hours=1)).isoformat()
                    ),
                    request_record(
                        "c-bad", "bad-1", "hi", expires_at=now.replace(tzinfo=None).isoformat()
                    ),
                ],
            )
            # A backlog: produced two minutes ago, over WORKER_REQUEST_MAX_AGE_S.
            old_ms = round((time.time() - 120) * 1000)
            await _produce_dated(
                kafka_bootstrap,
                topics.requests,
                [
                    (
                        b"c-old",
                        json.dumps(
                            {"request_id": "old-1", "conversation_id": "c-old", "input": "hi"}
                        ).encode(),
                        old_ms,
                    )
                ],
            )
            await reader.wait_for_responses(["x-2", "x-3", "soon-1", "old-1"], 60)
            await reader.wait_for(lambda out: len(out.dlq) == 1, 30, "the dead letter")
            await asyncio.sleep(1)  # a duplicate response would show up by now
            out = reader.outputs
            by_request = {rid: rs for rid, rs in out.responses_by_request().items()}
            assert all(len(rs) == 1 for rs in by_request.values()), by_request
            first, expired, after = (by_request[r][0] for r in ("x-1", "x-2", "x-3"))
            assert expired["status"] == "expired", expired
            assert expired["error"]["code"] == "request_expired"
            assert expired["error"]["retryable"] is False
            assert "expired at" in expired["error"]["message"]
            assert (expired["attempts"], expired["chat_id"], expired["text"]) == (0, None, "")
            assert expired["cost"] is None
            # The conversation goes on from its last reply, as if the expired turn never was.
            assert after["status"] == "completed", after
            assert after["previous_chat_id"] == first["chat_id"]
            assert after["text"] == "Your name is Ann."

            old = by_request["old-1"][0]
            assert old["status"] == "expired", old
            assert "WORKER_REQUEST_MAX_AGE_S" in old["error"]["message"]
            assert by_request["soon-1"][0]["status"] == "completed"
            assert out.deltas_of("x-2") == []
            assert out.deltas_of("old-1") == []

            [dead] = out.dlq
            headers = dict(dead.headers)
            assert headers["dlq-reason"] == b"invalid_field"
            assert b"expires_at" in headers["dlq-detail"]
        called = {call["request_id"] for call in simulator.calls()}
        assert called == {"x-1", "x-3", "soon-1"}, "no Vapi call for an expired request"
        metrics = parse_metrics(worker.metrics())
        assert metrics['chat_worker_requests_total{outcome="expired"}'] == 2
        assert metrics['chat_worker_requests_total{outcome="completed"}'] == 3
    finally:
        assert worker.terminate() == 0, worker.log_tail()
