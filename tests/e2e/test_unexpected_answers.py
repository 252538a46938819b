"""Answers nobody planned for end one request, never the worker: real broker, simulator, worker.

The rule under test: nothing Vapi answers may crash the process or stall a partition. One
request's trouble ends that request with a ``failed`` response, and the partition goes on; a
rate limit pauses the worker for a bounded time, visibly.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

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

SIM_ARGS = ("--first-token-latency-s", "0.05", "--inter-token-delay-s", "0.005")


async def test_a_status_outside_http_fails_one_request_and_the_partition_goes_on(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, tmp_path: Path
) -> None:
    """A 999 status line (a broken proxy) ends its request failed; the next turn completes."""
    worker = WorkerProcess(kafka_bootstrap, topics, simulator, tmp_path).start()
    try:
        await asyncio.to_thread(worker.wait_ready)
        async with OutputReader(kafka_bootstrap, topics) as reader:
            # One conversation, so both records are in one partition, the second behind the first.
            await produce(
                kafka_bootstrap,
                topics.requests,
                [
                    request_record("c-999", "c-999-1", "[[sim:fault rawstatus code=999]] hi"),
                    request_record("c-999", "c-999-2", "Hello again"),
                ],
            )
            await reader.wait_for_responses(["c-999-1", "c-999-2"], 60)
            await asyncio.sleep(1)  # a duplicate response would show up by now
            by_request = reader.outputs.responses_by_request()
            [broken] = by_request["c-999-1"]
            assert broken["status"] == "failed", broken
            assert broken["error"]["code"] == "vapi_protocol_error", broken
            assert broken["error"]["http_status"] is None, broken
            assert "999" in broken["error"]["message"], broken
            [after] = by_request["c-999-2"]
            assert after["status"] == "completed", after
            assert len(reader.outputs.responses) == 2
        assert worker.proc is not None
        assert worker.proc.poll() is None, worker.log_tail()
        calls = [c for c in simulator.calls() if c["request_id"] == "c-999-1"]
        assert [c["status"] for c in calls] == [999], "a status outside HTTP is not retried"
    finally:
        assert worker.terminate() == 0, worker.log_tail()


def _backoff_gauge(worker: WorkerProcess) -> float:
    return parse_metrics(worker.metrics()).get("chat_worker_vapi_backoff_seconds", -1.0)


def _readyz(worker: WorkerProcess) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{worker.http_port}/readyz", timeout=5)


async def test_an_absurd_retry_after_pauses_the_worker_for_the_cap_and_says_so(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, tmp_path: Path
) -> None:
    """A 429 asking for 1e20 seconds pauses the worker for RETRY_AFTER_MAX_S only.

    While the pause lasts, /readyz stays 200 (the pod can work, Vapi asked it to wait) and
    shows the pause in its ``info``, as does ``chat_worker_vapi_backoff_seconds``; the limited
    request and the ones behind it are then served.
    """
    cap_s = 4.0
    worker = WorkerProcess(
        kafka_bootstrap, topics, simulator, tmp_path, RETRY_AFTER_MAX_S=str(cap_s)
    ).start()
    try:
        await asyncio.to_thread(worker.wait_ready)
        fault = "[[sim:fault status code=429 retry_after=99999999999999999999 times=1]]"
        async with OutputReader(kafka_bootstrap, topics) as reader:
            await produce(
                kafka_bootstrap,
                topics.requests,
                [request_record("c-429", "c-429-1", f"{fault} hi")],
            )
            deadline = time.monotonic() + 30
            while (paused := await asyncio.to_thread(_backoff_gauge, worker)) <= 0:
                assert time.monotonic() < deadline, "no backoff shown after the 429"
                await asyncio.sleep(0.05)
            ready = await asyncio.to_thread(_readyz, worker)
            assert 0 < paused <= cap_s
            assert ready.status_code == 200, ready.text
            assert 0 < ready.json()["info"]["vapi_backoff_s"] <= cap_s, ready.text
            # Taken during the pause: it waits the pause out, then is served.
            await produce(
                kafka_bootstrap, topics.requests, [request_record("c-other", "c-other-1", "hello")]
            )
            await reader.wait_for_responses(["c-429-1", "c-other-1"], 60)
            by_request = reader.outputs.responses_by_request()
            [limited] = by_request["c-429-1"]
            assert (limited["status"], limited["attempts"]) == ("completed", 2), limited
            [other] = by_request["c-other-1"]
            assert (other["status"], other["attempts"]) == ("completed", 1), other
        calls = simulator.calls()
        [rejected] = [c for c in calls if c["request_id"] == "c-429-1" and c["status"] == 429]
        [served] = [c for c in calls if c["request_id"] == "c-other-1"]
        # The other request's call waited for the worker's pause (timestamps: the simulator's).
        assert served["started_at"] >= rejected["ended_at"] + cap_s - 0.5
        assert await asyncio.to_thread(_backoff_gauge, worker) == 0
        after = await asyncio.to_thread(_readyz, worker)
        assert after.status_code == 200
        assert after.json()["info"]["vapi_backoff_s"] == 0
    finally:
        assert worker.terminate() == 0, worker.log_tail()
