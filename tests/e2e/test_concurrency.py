"""Concurrency through the real broker: key order, the in-flight bound, safe commits, backpressure.

Every claim of docs/design.md §3 is checked here with a worker process, the simulator and Kafka:
timings come from the simulator's call records (its own clock), never from how fast things ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import pytest

from tests.e2e.harness import (
    OutputReader,
    SimulatorProcess,
    Topics,
    WorkerProcess,
    calls_by_request,
    committed_offsets,
    paced,
    parse_metrics,
    produce,
    read_topic,
    request_record,
)

pytestmark = pytest.mark.e2e


def assert_one_completed_response_each(reader: OutputReader, request_ids: list[str]) -> None:
    by_request = reader.outputs.responses_by_request()
    assert set(by_request) == set(request_ids)
    for request_id in request_ids:
        statuses = [r["status"] for r in by_request[request_id]]
        assert statuses == ["completed"], (request_id, by_request[request_id])


@pytest.mark.timeout(150)
async def test_one_conversation_stays_serial_while_fifty_others_stream_beside_it(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, tmp_path: Path
) -> None:
    """A conversation's turns run one after another in offset order while 50 others overlap them."""
    worker = WorkerProcess(
        kafka_bootstrap, topics, simulator, tmp_path, TOPIC_PARTITIONS="1"
    ).start()
    try:
        worker.wait_ready()
        turns = [f"main-{turn}" for turn in range(1, 6)]
        others = [f"other{n:02d}-1" for n in range(50)]
        # One partition: main-1, 10 others, main-2, 10 others, ..., main-5, 10 others.
        records = []
        for i, turn in enumerate(turns):
            records.append(
                request_record("main", turn, paced(turn, tokens=3, delay_ms=100, first_ms=1500))
            )
            records += [
                request_record(
                    rid.rsplit("-", 1)[0], rid, paced(rid, tokens=5, delay_ms=400, first_ms=3000)
                )
                for rid in others[10 * i : 10 * i + 10]
            ]
        async with OutputReader(kafka_bootstrap, topics) as reader:
            await produce(kafka_bootstrap, topics.requests, records)
            await reader.wait_for_responses(turns + others, 90)
            assert_one_completed_response_each(reader, turns + others)

        calls = calls_by_request(simulator)
        assert all(len(calls[rid]) == 1 for rid in turns + others), calls
        chain = [calls[rid][0] for rid in turns]
        # Strictly one after another, in offset order, each continuing from the one before.
        assert sorted(chain, key=lambda c: c["started_at"]) == chain
        assert chain[0]["previous_chat_id"] is None
        for before, after in itertools.pairwise(chain):
            assert after["started_at"] >= before["ended_at"], (before, after)
            assert after["previous_chat_id"] == before["chat_id"], (before, after)
        # Not blocked behind it: every other conversation, even those after main-5 in the
        # partition, was called before the conversation's last turn was.
        assert max(calls[rid][0]["started_at"] for rid in others) < chain[-1]["started_at"]
        assert simulator.stats()["peak_streams_in_flight"] >= 20
    finally:
        worker.terminate()


@pytest.mark.timeout(150)
async def test_streams_in_flight_reach_the_bound_and_never_exceed_it(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, tmp_path: Path
) -> None:
    """With WORKER_MAX_IN_FLIGHT=5, 40 slow conversations peak at exactly 5 open Vapi streams."""
    worker = WorkerProcess(
        kafka_bootstrap, topics, simulator, tmp_path, WORKER_MAX_IN_FLIGHT="5"
    ).start()
    try:
        worker.wait_ready()
        request_ids = [f"conv{n:02d}-1" for n in range(40)]
        records = [
            request_record(
                rid.rsplit("-", 1)[0], rid, paced(rid, tokens=4, delay_ms=80, first_ms=250)
            )
            for rid in request_ids
        ]
        async with OutputReader(kafka_bootstrap, topics) as reader:
            await produce(kafka_bootstrap, topics.requests, records)
            await reader.wait_for_responses(request_ids, 90)
            assert_one_completed_response_each(reader, request_ids)
        assert simulator.stats()["peak_streams_in_flight"] == 5
        assert Counter(c["request_id"] for c in simulator.calls()) == Counter(request_ids)
    finally:
        worker.terminate()


@pytest.mark.timeout(180)
async def test_a_crash_redelivers_only_the_unfinished_request_behind_the_committed_offset(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, tmp_path: Path
) -> None:
    """After SIGKILL, the commit stops at the unfinished request: only it is sent to Vapi again."""
    env = {
        "TOPIC_PARTITIONS": "1",
        "VAPI_FIRST_DELTA_TIMEOUT_S": "60",  # longer than the stall
        "BROKER_COMMIT_INTERVAL": "0.5",  # Faust settings read from the environment
        "BROKER_SESSION_TIMEOUT": "6",  # the killed member leaves the group soon
        "BROKER_HEARTBEAT_INTERVAL": "1",
    }
    worker = WorkerProcess(kafka_bootstrap, topics, simulator, tmp_path, "first", **env).start()
    fast = [f"fast{n}-1" for n in range(8)]
    fast_pace = {"tokens": 3, "delay_ms": 10, "first_ms": 20}
    try:
        worker.wait_ready()
        async with OutputReader(kafka_bootstrap, topics) as reader:
            # Offset 0, finished and committed before the slow one arrives.
            await produce(
                kafka_bootstrap,
                topics.requests,
                [request_record("warm", "warm-1", paced("warm", **fast_pace))],
            )
            await reader.wait_for_responses(["warm-1"], 60)
            await _wait_for_commit(kafka_bootstrap, topics, 1)
            # Offset 1: stalls 30 s before its first delta, on its first call only.
            slow_text = "slow [[sim:fault stall after=0 seconds=30 times=1]]"
            await produce(
                kafka_bootstrap,
                topics.requests,
                [
                    request_record("slow", "slow-1", slow_text),
                    *(request_record(r.split("-")[0], r, paced(r, **fast_pace)) for r in fast),
                ],
            )
            await reader.wait_for_responses(fast, 60)
            slow_calls = calls_by_request(simulator)["slow-1"]
            assert len(slow_calls) == 1
            assert slow_calls[0]["ended_at"] is None, "the slow request must still be in flight"
            await _wait_for_changelog(kafka_bootstrap, topics, fast)
            await asyncio.sleep(2.0)  # four commit intervals: a commit past offset 1 would show
            assert await committed_offsets(kafka_bootstrap, topics.app_id, topics.requests) == {
                0: 1
            }
            assert "slow-1" not in reader.outputs.responses_by_request()
            worker.kill()

            worker = WorkerProcess(
                kafka_bootstrap, topics, simulator, tmp_path, "second", **env
            ).start()
            worker.wait_ready(90)
            await reader.wait_for_responses(["slow-1"], 60)
            await _wait_for_metric(
                worker, 'chat_worker_requests_total{outcome="duplicate"}', len(fast)
            )
            await _wait_for_commit(kafka_bootstrap, topics, 2 + len(fast))
            assert_one_completed_response_each(reader, ["warm-1", "slow-1", *fast])

        calls = calls_by_request(simulator)
        assert {rid: len(found) for rid, found in calls.items()} == {
            "warm-1": 1,
            "slow-1": 2,
            **dict.fromkeys(fast, 1),
        }
        first, second = calls["slow-1"]
        assert first["outcome"] != "completed"
        assert second["outcome"] == "completed"
        # The redelivery did not trip the new worker up: no error logged, a clean stop.
        assert worker.terminate() == 0, worker.log_tail()
        errors = [r for r in worker.log_records() if r.get("level") in ("error", "critical")]
        assert not errors, errors
    finally:
        worker.kill()


async def _wait_for_commit(
    bootstrap: str, topics: Topics, offset: int, timeout_s: float = 30
) -> None:
    async def committed() -> int | None:
        return (await committed_offsets(bootstrap, topics.app_id, topics.requests)).get(0)

    deadline = asyncio.get_running_loop().time() + timeout_s
    while (found := await committed()) != offset:
        assert found is None or found < offset, f"committed {found}, past {offset}"
        assert asyncio.get_running_loop().time() < deadline, f"offset {offset} never committed"
        await asyncio.sleep(0.2)


async def _wait_for_changelog(
    bootstrap: str, topics: Topics, request_ids: list[str], timeout_s: float = 30
) -> None:
    """Wait until the table's changelog records every request in ``request_ids`` as finished."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        records = await read_topic(bootstrap, topics.changelog())
        finished = {r for rec in records for r in json.loads(rec.value)["finished"]}
        if set(request_ids) <= finished:
            return
        assert asyncio.get_running_loop().time() < deadline, f"changelog has only {finished}"
        await asyncio.sleep(0.2)


async def _wait_for_metric(
    worker: WorkerProcess, sample: str, value: float, timeout_s: float = 30
) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while (found := parse_metrics(worker.metrics()).get(sample)) != value:
        assert asyncio.get_running_loop().time() < deadline, f"{sample} is {found}, not {value}"
        await asyncio.sleep(0.2)


@pytest.mark.timeout(150)
async def test_table_writes_land_in_the_changelog_partition_of_their_conversation(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, tmp_path: Path
) -> None:
    """Every changelog write sits in its conversation's request partition, even when queued long."""
    worker = WorkerProcess(
        kafka_bootstrap, topics, simulator, tmp_path, TOPIC_PARTITIONS="4", WORKER_MAX_IN_FLIGHT="4"
    ).start()
    try:
        worker.wait_ready()
        conversations = [f"conv{n:02d}" for n in range(24)]
        request_ids = [f"{conv}-{turn}" for turn in (1, 2) for conv in conversations]
        # The first four hold every slot for 1.5 s: all others are taken early and run late.
        records = [
            request_record(
                rid.rsplit("-", 1)[0],
                rid,
                paced(rid, tokens=2, delay_ms=50, first_ms=1500 if i < 4 else 100),
            )
            for i, rid in enumerate(request_ids)
        ]
        async with OutputReader(kafka_bootstrap, topics) as reader:
            await produce(kafka_bootstrap, topics.requests, records)
            await reader.wait_for_responses(request_ids, 90)
            assert_one_completed_response_each(reader, request_ids)
            queued_ms = [r["timings"]["queued_ms"] for r in reader.outputs.responses]
            assert sum(q >= 1000 for q in queued_ms) >= len(request_ids) // 2, queued_ms

        request_partitions: dict[str, set[int]] = defaultdict(set)
        for record in await read_topic(kafka_bootstrap, topics.requests):
            request_partitions[record.key.decode()].add(record.partition)
        assert len({p for found in request_partitions.values() for p in found}) > 1
        await _wait_for_changelog(kafka_bootstrap, topics, request_ids)
        changelog_partitions: dict[str, set[int]] = defaultdict(set)
        for record in await read_topic(kafka_bootstrap, topics.changelog()):
            changelog_partitions[json.loads(record.key)].add(record.partition)
        assert set(changelog_partitions) == set(conversations)
        for conv in conversations:
            assert len(request_partitions[conv]) == 1
            assert changelog_partitions[conv] == request_partitions[conv], conv
    finally:
        worker.terminate()


@pytest.mark.timeout(150)
async def test_a_backlog_is_taken_no_faster_than_the_buffer_and_slot_bounds_allow(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, tmp_path: Path
) -> None:
    """With a 200-record backlog, buffered records stay <= 10 and streams <= 5; all are answered."""
    worker = WorkerProcess(
        kafka_bootstrap,
        topics,
        simulator,
        tmp_path,
        WORKER_MAX_BUFFERED="10",
        WORKER_MAX_IN_FLIGHT="5",
    ).start()
    try:
        worker.wait_ready()
        request_ids = [f"conv{n:03d}-{turn}" for turn in (1, 2) for n in range(100)]
        records = [
            request_record(
                rid.rsplit("-", 1)[0], rid, paced(rid, tokens=2, delay_ms=20, first_ms=60)
            )
            for rid in request_ids
        ]
        samples: list[dict[str, float]] = []
        stop = asyncio.Event()

        async def sample() -> None:
            url = f"http://127.0.0.1:{worker.http_port}/metrics"
            async with httpx.AsyncClient(timeout=5) as client:
                while not stop.is_set():
                    samples.append(parse_metrics((await client.get(url)).text))
                    await asyncio.sleep(0.02)

        async with OutputReader(kafka_bootstrap, topics) as reader:
            sampler = asyncio.create_task(sample())
            try:
                await produce(kafka_bootstrap, topics.requests, records)
                await reader.wait_for_responses(request_ids, 120)
            finally:
                stop.set()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
            assert_one_completed_response_each(reader, request_ids)

        buffered = [s["chat_worker_buffered"] for s in samples]
        in_flight = [s["chat_worker_in_flight"] for s in samples]
        assert len(samples) >= 10
        assert max(buffered) <= 10
        assert max(in_flight) <= 5
        assert max(buffered) > 5, "the sampler never saw a backlog"
        assert simulator.stats()["peak_streams_in_flight"] <= 5
    finally:
        worker.terminate()
