"""Bad input and Vapi's faults, end to end: real broker, simulator process, worker process.

Bad records must land in the dead-letter topic unchanged, with their reason and source, and be
counted; Vapi's faults must end every request with exactly one response. The fault run appends
one JSON line per scenario to ``.run/fault-report.jsonl`` (a table for the release notes).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.harness import (
    ROOT,
    OutputReader,
    Outputs,
    SimulatorProcess,
    Topics,
    WorkerProcess,
    produce,
    request_record,
)
from worker.messages import RecordHeaders

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

REPORT = ROOT / ".run" / "fault-report.jsonl"
SIM_ARGS = ("--first-token-latency-s", "0.05", "--inter-token-delay-s", "0.005")
DENIED_ASSISTANT = "sim-denied"
DLQ_HEADERS = (
    "dlq-reason",
    "dlq-detail",
    "dlq-source-topic",
    "dlq-source-partition",
    "dlq-source-offset",
)


@pytest.fixture
def simulator() -> Iterator[SimulatorProcess]:
    """A fast simulator that answers every call for DENIED_ASSISTANT with 401."""
    sim = SimulatorProcess(*SIM_ARGS, "--fault", f"assistant={DENIED_ASSISTANT}:status code=401")
    sim.start()
    yield sim
    sim.stop()


# --- bad input -----------------------------------------------------------------------------------


def _body(**fields: Any) -> bytes:
    document = {"request_id": "r-bad", "conversation_id": "conv-bad", "input": "hi", **fields}
    return json.dumps({k: v for k, v in document.items() if v is not ...}).encode()


@dataclass(frozen=True)
class BadRecord:
    """One invalid record and the reason code the worker must give it."""

    case: str
    key: bytes | None
    value: bytes
    reason: str
    extra_headers: tuple[tuple[str, bytes | None], ...] = ()

    def headers(self, index: int) -> RecordHeaders:
        trace = f"00-{index + 1:032x}-{index + 1:016x}-01".encode()
        return [("x-case", self.case.encode()), ("traceparent", trace), *self.extra_headers]


MAX_INPUT_CHARS = 40
MAX_METADATA_BYTES = 64
BAD_RECORDS = [
    BadRecord("not json", b"conv-bad", b"this is {not json", "not_json"),
    BadRecord("not utf-8", b"conv-bad", b'{"request_id": "r-\xff\xfe", "input": "hi"}', "not_utf8"),
    BadRecord("json array", b"conv-bad", b'[{"request_id": "r-bad"}]', "not_object"),
    BadRecord("schema v9 field", b"conv-bad", _body(schema="chat.request.v9"), "unknown_schema"),
    BadRecord(
        "schema v9 header",
        b"conv-bad",
        _body(),
        "unknown_schema",
        (("schema", b"chat.request.v9"),),
    ),
    BadRecord("no conversation_id", b"conv-bad", _body(conversation_id=...), "missing_field"),
    BadRecord("empty conversation_id", b"", _body(conversation_id=""), "empty_conversation_id"),
    BadRecord("key mismatch", b"conv-other", _body(), "key_mismatch"),
    BadRecord("no key", None, _body(), "missing_key"),
    BadRecord(
        "oversized input", b"conv-bad", _body(input="x" * (MAX_INPUT_CHARS + 1)), "input_too_large"
    ),
    BadRecord("input of wrong type", b"conv-bad", _body(input=42), "invalid_field"),
    BadRecord(
        "huge metadata",
        b"conv-bad",
        _body(metadata={"blob": "y" * MAX_METADATA_BYTES}),
        "metadata_too_large",
    ),
    BadRecord("empty value", b"conv-bad", b"", "empty"),
    BadRecord("not json without a key", None, b"{", "not_json"),
    BadRecord(
        "null and repeated headers",
        b"conv-bad",
        b"[]",
        "not_object",
        (("x-null", None), ("x-twice", b"1"), ("x-twice", b"2")),
    ),
    BadRecord(
        "replayed from the DLQ",
        b"conv-bad",
        _body(input=7),
        "invalid_field",
        (("dlq-reason", b"not_json"), ("dlq-source-offset", b"3")),
    ),
]


async def _produce_each(
    bootstrap: str, topic: str, records: Sequence[tuple[bytes | None, bytes, RecordHeaders]]
) -> list[tuple[int, int]]:
    """Produce records in order, each with its own headers; returns (partition, offset) of each."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        futures = [
            await producer.send(topic, value, key=key, headers=headers)
            for key, value, headers in records
        ]
        sent = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return [(meta.partition, meta.offset) for meta in sent]


def _samples(worker: WorkerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the worker's /metrics, keyed by (name, sorted labels)."""
    found = {}
    for family in text_string_to_metric_families(worker.metrics()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def _wait_for_samples(
    worker: WorkerProcess, expected: dict[tuple[str, tuple[tuple[str, str], ...]], float]
) -> None:
    """Poll /metrics until every expected sample has its value (counters settle just after)."""
    deadline = time.monotonic() + 15
    while True:
        samples = _samples(worker)
        wrong = {k: (samples.get(k), v) for k, v in expected.items() if samples.get(k) != v}
        if not wrong:
            return
        assert time.monotonic() < deadline, f"metrics (found, wanted): {wrong}"
        await asyncio.sleep(0.2)


async def test_bad_records_go_to_the_dlq_unchanged_with_reason_and_source_and_are_counted(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, tmp_path: Path
) -> None:
    """Each kind of bad record is dead-lettered as-is with its reason code; a good one follows."""
    worker = WorkerProcess(
        kafka_bootstrap,
        topics,
        simulator,
        tmp_path,
        MAX_INPUT_CHARS=str(MAX_INPUT_CHARS),
        MAX_METADATA_BYTES=str(MAX_METADATA_BYTES),
    ).start()
    try:
        worker.wait_ready()
        records = [(bad.key, bad.value, bad.headers(i)) for i, bad in enumerate(BAD_RECORDS)]
        good = request_record("conv-bad", "conv-bad-ok", "Hello after the bad ones")
        async with OutputReader(kafka_bootstrap, topics) as reader:
            positions = await _produce_each(
                kafka_bootstrap, topics.requests, [*records, (*good, [])]
            )
            await reader.wait_for_responses(["conv-bad-ok"], 60)
            await reader.wait_for(
                lambda out: len(out.dlq) >= len(BAD_RECORDS), 30, "every bad record in the DLQ"
            )
            await asyncio.sleep(1)  # anything published twice would show up by now
            dead = {dict(r.headers)["x-case"].decode(): r for r in reader.outputs.dlq}
            assert len(reader.outputs.dlq) == len(dead) == len(BAD_RECORDS)

            for index, bad in enumerate(BAD_RECORDS):
                record = dead[bad.case]
                assert (record.key, record.value) == (bad.key, bad.value), bad.case
                # Earlier dlq-* headers (a replayed record) give way to this failure's.
                kept = [h for h in bad.headers(index) if not h[0].startswith("dlq-")]
                headers = list(record.headers)
                assert headers[: len(kept)] == kept, bad.case
                added = dict(headers[len(kept) :])
                assert sorted(added) == sorted(DLQ_HEADERS), bad.case
                partition, offset = positions[index]
                assert added["dlq-reason"].decode() == bad.reason, (bad.case, added)
                assert added["dlq-source-topic"].decode() == topics.requests
                assert int(added["dlq-source-partition"]) == partition
                assert int(added["dlq-source-offset"]) == offset

            [answer] = reader.outputs.responses_by_request()["conv-bad-ok"]
            assert answer["status"] == "completed", answer
            assert len(reader.outputs.responses) == 1

            reasons = Counter(bad.reason for bad in BAD_RECORDS)
            await _wait_for_samples(
                worker,
                {
                    ("chat_worker_requests_total", (("outcome", "invalid"),)): len(BAD_RECORDS),
                    ("chat_worker_requests_total", (("outcome", "completed"),)): 1,
                    **{
                        ("chat_worker_dlq_total", (("reason", reason),)): count
                        for reason, count in reasons.items()
                    },
                    ("chat_worker_dlq_total", (("reason", "other"),)): 0,
                },
            )
    finally:
        worker.terminate()


async def test_records_not_keyed_by_their_conversation_are_dead_lettered_without_a_vapi_call(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, tmp_path: Path
) -> None:
    """A null key or another conversation's key: DLQ with its reason, no Vapi call, no response.

    Such a record may sit on another partition than its conversation's other turns, where it
    would run beside them on stale state. A correctly keyed turn of the same conversation,
    produced between them, completes.
    """
    worker = WorkerProcess(kafka_bootstrap, topics, simulator, tmp_path).start()
    try:
        worker.wait_ready()
        unkeyed = _body(request_id="r-unkeyed", conversation_id="conv-k")
        misrouted = _body(request_id="r-misrouted", conversation_id="conv-k")
        good = request_record("conv-k", "r-good", "My name is Kim.")
        async with OutputReader(kafka_bootstrap, topics) as reader:
            positions = await _produce_each(
                kafka_bootstrap,
                topics.requests,
                [(None, unkeyed, []), (*good, []), (b"conv-other", misrouted, [])],
            )
            await reader.wait_for_responses(["r-good"], 60)
            await reader.wait_for(lambda out: len(out.dlq) >= 2, 30, "both records in the DLQ")
            await asyncio.sleep(1)  # a response or call for either would show up by now

            by_reason = {dict(r.headers)["dlq-reason"].decode(): r for r in reader.outputs.dlq}
            assert sorted(by_reason) == ["key_mismatch", "missing_key"]
            for reason, key, value, (partition, offset) in [
                ("missing_key", None, unkeyed, positions[0]),
                ("key_mismatch", b"conv-other", misrouted, positions[2]),
            ]:
                record = by_reason[reason]
                assert (record.key, record.value) == (key, value), reason
                headers = dict(record.headers)
                assert int(headers["dlq-source-partition"]) == partition, reason
                assert int(headers["dlq-source-offset"]) == offset, reason

            assert [r["request_id"] for r in reader.outputs.responses] == ["r-good"]
            [answer] = reader.outputs.responses
            assert answer["status"] == "completed", answer
            assert answer["text"] == "Nice to meet you, Kim! I will remember your name."
            assert [call.get("request_id") for call in simulator.calls()] == ["r-good"]
    finally:
        worker.terminate()


# --- Vapi faults ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """A fault, the requests that meet it, and what each of them must end with."""

    fault: str
    text: str
    calls: int  # Vapi calls one request needs to get through the fault
    attempts: int
    status: str = "completed"
    assistant_id: str | None = None
    broken_deltas: int = 0  # deltas attempt 1 streamed before it broke
    context_reset: bool = False
    setup_turn: str | None = None  # a turn run first on the same conversation

    def request_ids(self, count: int) -> list[str]:
        slug = self.fault.replace(" ", "-")
        return [f"{slug}-{i}-2" for i in range(count)]


REQUESTS_PER_SCENARIO = 3
SCENARIOS = [
    Scenario(
        "429 twice then ok",
        "[[sim:fault status code=429 retry_after=1 times=2]] hello",
        calls=3,
        attempts=3,
    ),
    Scenario(
        "503 once then ok", "[[sim:fault status code=503 times=1]] hello", calls=2, attempts=2
    ),
    Scenario(
        "disconnect after 3 once then ok",
        "[[sim:fault disconnect after=3 times=1]] hello",
        calls=2,
        attempts=2,
        broken_deltas=3,
    ),
    Scenario(
        "401 assistant refused",
        "hello",
        calls=1,
        attempts=1,
        status="failed",
        assistant_id=DENIED_ASSISTANT,
    ),
    Scenario(
        "400 chat of another assistant",
        "What's my name?",
        calls=2,
        attempts=2,
        assistant_id="sim-other-assistant",
        context_reset=True,
        setup_turn="My name is Ada.",
    ),
]
# Needs the simulator to forget every chat (a restart) between the two turns.
LOST_CHAT = Scenario(
    "404 chat unknown after a Vapi restart",
    "What's my name?",
    calls=2,
    attempts=2,
    context_reset=True,
    setup_turn="My name is Ada.",
)


def _conversation(request_id: str) -> str:
    return request_id.rsplit("-", 1)[0]


def _records(scenario: Scenario, *, setup: bool) -> list[tuple[bytes, bytes]]:
    records = []
    for request_id in scenario.request_ids(REQUESTS_PER_SCENARIO):
        conversation = _conversation(request_id)
        if setup:
            assert scenario.setup_turn is not None
            records.append(request_record(conversation, f"{conversation}-1", scenario.setup_turn))
            continue
        extra = {} if scenario.assistant_id is None else {"assistant_id": scenario.assistant_id}
        records.append(request_record(conversation, request_id, scenario.text, **extra))
    return records


def _unique_deltas(outputs: Outputs, request_id: str) -> dict[int, list[dict[str, Any]]]:
    """The request's deltas by attempt, deduplicated by (attempt, seq) as a consumer would."""
    by_attempt: dict[int, dict[int, dict[str, Any]]] = {}
    for delta in outputs.deltas_of(request_id):
        by_attempt.setdefault(delta["attempt"], {}).setdefault(delta["seq"], delta)
    return {attempt: [seqs[s] for s in sorted(seqs)] for attempt, seqs in by_attempt.items()}


def _report(
    scenario: Scenario, outputs: Outputs, calls: list[dict[str, Any]]
) -> dict[str, str | int]:
    """The scenario's line of the fault report."""
    ids = scenario.request_ids(REQUESTS_PER_SCENARIO)
    by_request = outputs.responses_by_request()
    finals = [by_request.get(request_id, []) for request_id in ids]
    calls_by_request = Counter(call["request_id"] for call in calls)
    return {
        "fault": scenario.fault,
        "runs": 1,
        "requests": len(ids),
        "completed": sum(1 for f in finals if f and f[0]["status"] == "completed"),
        "failed_with_error": sum(
            1
            for f in finals
            if f
            and f[0]["status"] == "failed"
            and {"code", "message", "retryable", "http_status"} <= set(f[0]["error"] or {})
        ),
        "lost": sum(1 for f in finals if not f),
        "duplicate_finals": sum(max(0, len(f) - 1) for f in finals),
        "duplicate_vapi_calls": sum(
            max(0, calls_by_request[request_id] - scenario.calls) for request_id in ids
        ),
    }


def _append_report(lines: list[dict[str, str | int]]) -> None:
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    with REPORT.open("a", encoding="utf-8") as report:
        for line in lines:
            report.write(json.dumps(line) + "\n")


def _assert_scenario(scenario: Scenario, outputs: Outputs, calls: list[dict[str, Any]]) -> None:
    """Every request of the scenario ended as expected, as seen by a consumer and by Vapi."""
    by_request = outputs.responses_by_request()
    for request_id in scenario.request_ids(REQUESTS_PER_SCENARIO):
        where = (scenario.fault, request_id)
        [response] = by_request[request_id]
        assert response["status"] == scenario.status, (where, response)
        assert response["attempts"] == scenario.attempts, (where, response)
        assert response["context_reset"] is scenario.context_reset, (where, response)
        sent = [c["attempt"] for c in calls if c["request_id"] == request_id]
        assert sent == list(range(1, scenario.calls + 1)), (where, sent)
        deltas = _unique_deltas(outputs, request_id)
        if scenario.status == "failed":
            assert response["error"]["code"] == "vapi_auth_error", (where, response)
            assert response["error"]["retryable"] is False
            assert response["error"]["http_status"] == 401
            assert response["error"]["message"]
            assert deltas == {}, where
            continue
        assert response["error"] is None
        final = deltas.pop(scenario.attempts)
        assert [d["seq"] for d in final] == list(range(len(final))), where
        assert "".join(d["delta"] for d in final) == response["text"], where
        assert response["delta_count"] == len(final) > 0, where
        assert {d["chat_id"] for d in final} == {response["chat_id"]}, where
        if scenario.broken_deltas:
            broken = deltas.pop(1)
            assert [d["seq"] for d in broken] == list(range(scenario.broken_deltas)), where
            assert response["text"].startswith("".join(d["delta"] for d in broken)), where
        assert deltas == {}, (where, "no deltas from attempts that failed before streaming")
        if scenario.context_reset:
            assert response["text"] == "I don't know your name yet.", where
            assert response["previous_chat_id"] is None, where


def _restart_on_same_port(sim: SimulatorProcess) -> SimulatorProcess:
    """Stop the simulator and start a fresh one (no chats) where the worker expects it."""
    sim.stop()
    fresh = SimulatorProcess(*SIM_ARGS)
    fresh.port, fresh.base_url = sim.port, sim.base_url
    return fresh.start()


async def test_vapi_faults_end_every_request_with_exactly_one_response(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, tmp_path: Path
) -> None:
    """Rate limits, 5xx, broken streams, refusals and stale chats: one right response each."""
    worker = WorkerProcess(kafka_bootstrap, topics, simulator, tmp_path).start()
    restarted: SimulatorProcess | None = None
    try:
        worker.wait_ready()
        async with OutputReader(kafka_bootstrap, topics) as reader:
            staged = [s for s in (*SCENARIOS, LOST_CHAT) if s.setup_turn is not None]
            setup = [record for s in staged for record in _records(s, setup=True)]
            await produce(kafka_bootstrap, topics.requests, setup)
            await reader.wait_for_responses([json.loads(v)["request_id"] for _, v in setup], 60)

            mixed = [record for s in SCENARIOS for record in _records(s, setup=False)]
            await produce(kafka_bootstrap, topics.requests, mixed)
            await reader.wait_for_responses([json.loads(v)["request_id"] for _, v in mixed], 90)
            calls = simulator.calls()

            restarted = _restart_on_same_port(simulator)
            await produce(kafka_bootstrap, topics.requests, _records(LOST_CHAT, setup=False))
            await reader.wait_for_responses(LOST_CHAT.request_ids(REQUESTS_PER_SCENARIO), 60)
            lost_chat_calls = restarted.calls()
            await asyncio.sleep(1)  # a duplicate response would show up by now
            outputs = reader.outputs

            _append_report(
                [
                    *(_report(s, outputs, calls) for s in SCENARIOS),
                    _report(LOST_CHAT, outputs, lost_chat_calls),
                ]
            )
            for scenario in SCENARIOS:
                _assert_scenario(scenario, outputs, calls)
            _assert_scenario(LOST_CHAT, outputs, lost_chat_calls)
            for response in outputs.responses:
                if response["status"] == "failed":
                    assert set(response["error"]) == {"code", "message", "retryable", "http_status"}
            expected = len(setup) + len(mixed) + REQUESTS_PER_SCENARIO
            assert len(outputs.responses) == len(outputs.responses_by_request()) == expected
            assert outputs.dlq == []
            n = REQUESTS_PER_SCENARIO
            await _wait_for_samples(
                worker,
                {
                    ("chat_worker_retries_total", (("reason", "rate_limited"),)): 2 * n,
                    ("chat_worker_retries_total", (("reason", "server_error"),)): n,
                    ("chat_worker_retries_total", (("reason", "stream_broken"),)): n,
                    ("chat_worker_retries_total", (("reason", "context_reset"),)): 2 * n,
                    ("chat_worker_vapi_responses_total", (("status", "401"),)): n,
                    ("chat_worker_vapi_ready", ()): 1,
                },
            )
            # The 401s made the worker unready; the successes after them made it ready again.
            async with httpx.AsyncClient() as http:
                ready = await http.get(f"http://127.0.0.1:{worker.http_port}/readyz", timeout=5)
            assert ready.status_code == 200, ready.text
    finally:
        worker.terminate()
        if restarted is not None:
            restarted.stop()
