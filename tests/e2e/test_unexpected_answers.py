"""Answers nobody planned for end one request, never the worker: real broker, simulator, worker.

The rule under test: nothing Vapi answers may crash the process or stall a partition. One
request's trouble ends that request with a ``failed`` response, and the partition goes on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import (
    OutputReader,
    SimulatorProcess,
    Topics,
    WorkerProcess,
    produce,
    request_record,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

SIM_ARGS = ("--first-token-latency-s", "0.05", "--inter-token-delay-s", "0.005")


@pytest.fixture
def topics(unique_name: str) -> Topics:
    return Topics.unique(unique_name)


@pytest.fixture
def simulator() -> Iterator[SimulatorProcess]:
    sim = SimulatorProcess(*SIM_ARGS).start()
    yield sim
    sim.stop()


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
