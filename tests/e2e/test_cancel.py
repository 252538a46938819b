"""Cancel and supersede through the real broker, simulator and worker (docs/design.md §5.8).

A ``chat.cancel.v1`` (from ``ChatClient.cancel``, ``vapi-worker cancel`` or any producer) ends a
streaming request at once: its HTTP call is closed (the simulator records it), its deltas stay,
and its one final response says ``cancelled`` with the text streamed so far. A request queued
behind it ends ``cancelled`` without a call. Nothing of another conversation, nor a request
taken after the cancel, is touched. A cancelled turn is not the conversation's context: the next
turn continues from the chat before it (the simulator records its ``previousChatId``). A request
with ``supersede`` does the same to the requests of its conversation before it, then runs. A bad
cancel goes to the dead-letter topic with its reason.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import (
    OutputReader,
    Outputs,
    SimulatorProcess,
    Topics,
    Workers,
    calls_by_request,
    paced,
    parse_metrics,
    produce,
    request_record,
)
from vapi_stream_client import ChatClient, partition_for
from vapi_stream_client import Topics as ClientTopics

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

SIM_ARGS = ("--first-token-latency-s", "0.02", "--inter-token-delay-s", "0.005")
#: A reply that streams for about 30 s unless it is cancelled: 300 deltas, 100 ms apart.
SLOW = {"tokens": 300, "delay_ms": 100}
#: The issue's bound is one second from the cancel read to the HTTP call closed; the test allows
#: this much from the cancel sent to the simulator's end of the call, on a busy 2-core machine.
CLOSED_WITHIN_S = 5.0


@pytest.fixture
def simulator() -> Iterator[SimulatorProcess]:
    sim = SimulatorProcess(*SIM_ARGS).start()
    yield sim
    sim.stop()


def _same_partition(prefix: str, like: str, partitions: int = 4) -> str:
    """A conversation id starting with ``prefix`` on the partition of ``like``."""
    wanted = partition_for(like, partitions)
    return next(
        f"{prefix}{n}" for n in range(1000) if partition_for(f"{prefix}{n}", partitions) == wanted
    )


def _cancel_record(conversation: str, request_id: str | None = None, **extra: Any) -> bytes:
    body = {"schema": "chat.cancel.v1", "conversation_id": conversation, **extra}
    if request_id is not None:
        body["request_id"] = request_id
    return json.dumps(body).encode()


def _final(outputs: Outputs, request_id: str) -> dict[str, Any]:
    finals = outputs.responses_by_request()[request_id]
    assert len(finals) == 1, f"{request_id}: {len(finals)} final responses"
    return finals[0]


def _streamed(outputs: Outputs, request_id: str) -> str:
    return "".join(d["delta"] for d in sorted(outputs.deltas_of(request_id), key=_seq))


def _seq(delta: dict[str, Any]) -> int:
    return int(delta["seq"])


def _client(bootstrap: str, topics: Topics) -> ChatClient:
    return ChatClient(
        bootstrap,
        topics=ClientTopics(topics.requests, topics.deltas, topics.responses),
    )


async def _streaming(reader: OutputReader, request_id: str, deltas: int = 2) -> None:
    await reader.wait_for(
        lambda out: len(out.deltas_of(request_id)) >= deltas, 60, f"{request_id} streaming"
    )


async def test_a_cancel_closes_the_stream_ends_queued_requests_and_touches_nothing_else(
    kafka_bootstrap: str,
    simulator: SimulatorProcess,
    topics: Topics,
    workers: Workers,
    tmp_path: Path,
) -> None:
    worker = await workers.start_ready("worker")
    # "other" shares conversation a's partition: it is queued on the same partition and must
    # not be affected by a's cancel; b's cancel comes from the CLI.
    other = _same_partition("other-", "a")
    async with (
        OutputReader(kafka_bootstrap, topics) as reader,
        _client(kafka_bootstrap, topics) as client,
    ):
        await client.send("a", "my name is Ann", request_id="a-1")
        await reader.wait_for_responses(["a-1"])
        for conversation, request_id, text in [
            ("a", "a-2", paced("tell me a long story", **SLOW)),
            ("a", "a-3", "hello"),
            (other, "o-1", paced("a story for me too", tokens=20, delay_ms=100)),
            ("b", "b-1", paced("another long story", **SLOW)),
            ("b", "b-2", "still there?"),
        ]:
            await client.send(conversation, text, request_id=request_id)
        await _streaming(reader, "a-2")
        await _streaming(reader, "b-1")

        cancelled_at = time.time()
        await client.cancel("a", "a-2")
        env = {"PATH": "/usr/bin:/bin", "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, **topics.env()}
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "worker", "cancel", "--conversation", "b"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        cli_cancelled_at = time.time()
        await reader.wait_for_responses(["a-2", "a-3", "b-1", "b-2", "o-1"], 90)
        # Taken after b's cancel: not affected by it.
        await client.send("b", "my name is Bo", request_id="b-3")
        await reader.wait_for_responses(["b-3"], 60)

        out = reader.outputs
        for request_id in ("a-2", "b-1"):
            final = _final(out, request_id)
            assert final["status"] == "cancelled", final
            assert final["error"]["code"] == "cancelled"
            assert final["delta_count"] >= 2
            assert final["text"] == _streamed(out, request_id), "the text is not the deltas'"
            assert final["chat_id"] is not None
        b_queued = _final(out, "b-2")
        assert (b_queued["status"], b_queued["attempts"], b_queued["text"]) == ("cancelled", 0, "")
        for request_id in ("a-1", "a-3", "o-1", "b-3"):
            assert _final(out, request_id)["status"] == "completed", request_id

        calls = calls_by_request(simulator)
        assert "b-2" not in calls, "a cancelled queued request called Vapi"
        for request_id, sent_at in (("a-2", cancelled_at), ("b-1", cli_cancelled_at)):
            (call,) = calls[request_id]
            assert call["outcome"] == "client_closed", call
            assert call["deltas_sent"] < SLOW["tokens"]
            assert call["ended_at"] - sent_at < CLOSED_WITHIN_S, "the HTTP call stayed open"
        # The cancelled turn is not the context: a-3 continues from a-1's chat.
        a_1 = _final(out, "a-1")
        (a_3_call,) = calls["a-3"]
        assert a_3_call["previous_chat_id"] == a_1["chat_id"]
        assert _final(out, "a-3")["previous_chat_id"] == a_1["chat_id"]
        assert calls["b-3"][0]["previous_chat_id"] is None, "b's first turn was cancelled"

        metrics = parse_metrics(worker.metrics())
        assert metrics['chat_worker_requests_total{outcome="cancelled"}'] == 3
        assert metrics['chat_worker_cancels_total{effect="cancelled"}'] == 2
        assert metrics["chat_worker_cancel_seconds_count"] == 2


async def test_bad_cancels_go_to_the_dead_letter_topic_and_a_late_cancel_has_no_effect(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, workers: Workers
) -> None:
    worker = await workers.start_ready("worker")
    async with OutputReader(kafka_bootstrap, topics) as reader:
        await produce(kafka_bootstrap, topics.requests, [request_record("c", "c-1", "hi")])
        await reader.wait_for_responses(["c-1"])
        await produce(
            kafka_bootstrap,
            topics.requests,
            [
                (b"not-c", _cancel_record("c")),  # key_mismatch
                (None, _cancel_record("c")),  # missing_key
                (b"c", json.dumps({"schema": "chat.cancel.v1"}).encode()),  # missing_field
                (b"c", _cancel_record("c", request_id="")),  # invalid_field
                (b"c", _cancel_record("c", schema="chat.cancel.v9")),  # unknown_schema
                (b"c", _cancel_record("c", "c-1")),  # finished already: no effect
            ],
        )
        await reader.wait_for(lambda out: len(out.dlq) >= 5, 60, "5 dead letters")
        reasons = sorted(
            dict(record.headers)["dlq-reason"].decode() for record in reader.outputs.dlq
        )
        assert reasons == [
            "invalid_field",
            "key_mismatch",
            "missing_field",
            "missing_key",
            "unknown_schema",
        ]
        await produce(kafka_bootstrap, topics.requests, [request_record("c", "c-2", "again")])
        await reader.wait_for_responses(["c-2"])
        assert _final(reader.outputs, "c-1")["status"] == "completed"
        assert (
            _final(reader.outputs, "c-2")["previous_chat_id"]
            == _final(reader.outputs, "c-1")["chat_id"]
        )
        metrics = parse_metrics(worker.metrics())
        assert metrics['chat_worker_cancels_total{effect="none"}'] == 1
        assert metrics['chat_worker_requests_total{outcome="cancelled"}'] == 0


async def test_a_superseding_request_cancels_the_earlier_ones_then_runs(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, workers: Workers
) -> None:
    await workers.start_ready("worker")
    async with (
        OutputReader(kafka_bootstrap, topics) as reader,
        _client(kafka_bootstrap, topics) as client,
    ):
        await client.send("s", "my name is Sue", request_id="s-1")
        await reader.wait_for_responses(["s-1"])
        await client.send("s", paced("a long story", **SLOW), request_id="s-2")
        await client.send("s", "and then?", request_id="s-3")
        await _streaming(reader, "s-2")
        superseded_at = time.time()
        await client.send("s", "no, tell me a joke", request_id="s-4", supersede=True)
        await reader.wait_for_responses(["s-2", "s-3", "s-4"], 60)
        out = reader.outputs
        for request_id in ("s-2", "s-3"):
            final = _final(out, request_id)
            assert final["status"] == "cancelled"
            assert final["error"]["code"] == "superseded"
        assert _final(out, "s-2")["text"] == _streamed(out, "s-2")
        s_4 = _final(out, "s-4")
        assert s_4["status"] == "completed"
        calls = calls_by_request(simulator)
        assert "s-3" not in calls
        (s_2_call,) = calls["s-2"]
        assert s_2_call["outcome"] == "client_closed"
        assert s_2_call["ended_at"] - superseded_at < CLOSED_WITHIN_S
        assert calls["s-4"][0]["previous_chat_id"] == _final(out, "s-1")["chat_id"]
        assert s_4["previous_chat_id"] == _final(out, "s-1")["chat_id"]


async def test_a_hundred_cancels_each_end_their_stream_once(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, workers: Workers
) -> None:
    """100 streaming requests (20 at a time), each cancelled once it streams: each ends with one
    ``cancelled`` response and a closed call, within the test's bound. Prints the latencies
    docs/design.md §5.8 reports: the worker's (cancel taken → HTTP stream closed, from its log)
    and the simulator's (cancel sent → the simulator saw its call closed)."""
    worker = await workers.start_ready("worker", WORKER_MAX_IN_FLIGHT="20")
    sent_at: dict[str, float] = {}
    async with (
        OutputReader(kafka_bootstrap, topics) as reader,
        _client(kafka_bootstrap, topics) as client,
    ):
        for batch in range(5):
            ids = [f"n{batch}-{i}" for i in range(20)]
            for request_id in ids:
                await client.send(f"conv-{request_id}", paced("go", **SLOW), request_id=request_id)
            for request_id in ids:
                await _streaming(reader, request_id, deltas=1)
                sent_at[request_id] = time.time()
                await client.cancel(f"conv-{request_id}", request_id)
            await reader.wait_for_responses(ids, 60)
        for request_id in sent_at:
            assert _final(reader.outputs, request_id)["status"] == "cancelled"
    worker_ms = sorted(
        float(line["cancel_to_closed_ms"])
        for line in worker.log_records()
        if line.get("event") == "request cancelled while running"
    )
    calls = calls_by_request(simulator)
    assert all(calls[rid][0]["outcome"] == "client_closed" for rid in sent_at)
    seen_ms = sorted((calls[rid][0]["ended_at"] - sent_at[rid]) * 1000 for rid in sent_at)
    assert len(worker_ms) == len(seen_ms) == 100
    assert max(seen_ms) < CLOSED_WITHIN_S * 1000
    for name, values in (
        ("worker: taken -> closed", worker_ms),
        ("sent -> sim saw close", seen_ms),
    ):
        print(
            f"\ncancel latency, {name}, 100 cancels: p50 {statistics.median(values):.1f} ms, "
            f"p99 {values[98]:.1f} ms, max {values[-1]:.1f} ms"
        )
