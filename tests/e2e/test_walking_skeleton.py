"""The whole path through a real broker, the simulator and worker processes."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from tests.e2e.harness import (
    OutputReader,
    SimulatorProcess,
    Topics,
    WorkerProcess,
    chains_by_conversation,
    produce,
    request_record,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
TURNS = ["My name is {name}.", "What's my name?", "Tell me something about {name}."]


@pytest.fixture
def simulator() -> Iterator[SimulatorProcess]:
    sim = SimulatorProcess(
        "--first-token-latency-s", "0.05", "--inter-token-delay-s", "0.005"
    ).start()
    yield sim
    sim.stop()


def _validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads((SCHEMAS / f"{name}.json").read_text()))


async def test_two_conversations_three_turns_each_remember_and_survive_a_restart(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, tmp_path: Path
) -> None:
    """Interleaved turns chain their chat ids and stream in order; a new worker continues.

    The new worker finds the chat ids in the table, recovered from its changelog.
    """
    worker = WorkerProcess(kafka_bootstrap, topics, simulator, tmp_path).start()
    try:
        worker.wait_ready()
        names = {"conv-a": "Alice", "conv-b": "Bob"}
        records = [
            request_record(conv, f"{conv}-{turn}", text.format(name=name))
            for turn, text in enumerate(TURNS, start=1)
            for conv, name in names.items()
        ]
        async with OutputReader(kafka_bootstrap, topics) as reader:
            await produce(kafka_bootstrap, topics.requests, records)
            await reader.wait_for_responses([f"{c}-{t}" for c in names for t in (1, 2, 3)], 90)
            outputs = reader.outputs
            by_request = outputs.responses_by_request()

            for conv, name in names.items():
                second = by_request[f"{conv}-2"][0]
                assert name in second["text"], second
            _assert_streams_match_responses(outputs)
            _assert_chains(simulator.calls(), names, turns=3)

            # The restart: a new process in the same group must find the chat ids in the table.
            assert worker.terminate() == 0, worker.log_tail()
            worker = WorkerProcess(kafka_bootstrap, topics, simulator, tmp_path, "second").start()
            worker.wait_ready()
            await produce(
                kafka_bootstrap,
                topics.requests,
                [request_record("conv-a", "conv-a-4", "What's my name?")],
            )
            await reader.wait_for_responses(["conv-a-4"], 90)
            fourth = reader.outputs.responses_by_request()["conv-a-4"][0]
            assert "Alice" in fourth["text"]
            _assert_chains(simulator.calls(), {"conv-a": "Alice"}, turns=4)
            assert all(len(found) == 1 for found in reader.outputs.responses_by_request().values())
    finally:
        worker.terminate()


def _assert_streams_match_responses(outputs) -> None:  # type: ignore[no-untyped-def]
    delta_schema, response_schema = _validator("chat.delta.v1"), _validator("chat.response.v1")
    for response in outputs.responses:
        response_schema.validate(response)
        assert response["status"] == "completed", response
        deltas = outputs.deltas_of(response["request_id"], response["attempts"])
        for delta in deltas:
            delta_schema.validate(delta)
        assert [d["seq"] for d in deltas] == list(range(len(deltas)))
        assert "".join(d["delta"] for d in deltas) == response["text"]
        assert response["delta_count"] == len(deltas) > 0
        assert {d["chat_id"] for d in deltas} == {response["chat_id"]}


def _assert_chains(calls, names, turns: int) -> None:  # type: ignore[no-untyped-def]
    chains = chains_by_conversation(calls)
    for conv in names:
        chain = sorted(chains[conv], key=lambda call: int(call["request_id"].rsplit("-", 1)[1]))
        assert [c["request_id"] for c in chain] == [f"{conv}-{t}" for t in range(1, turns + 1)]
        assert chain[0]["previous_chat_id"] is None
        for before, after in itertools.pairwise(chain):
            assert after["previous_chat_id"] == before["chat_id"], (before, after)


async def test_bad_records_go_to_the_dlq_with_a_reason_and_the_next_good_one_is_answered(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, tmp_path: Path
) -> None:
    """Non-JSON, conversation-less and not-allowed-assistant records go to the DLQ with reasons.

    The next good record is answered.
    """
    worker = WorkerProcess(
        kafka_bootstrap,
        topics,
        simulator,
        tmp_path,
        VAPI_ASSISTANT_ALLOWLIST="sim-assistant, other-assistant",
    ).start()
    try:
        worker.wait_ready()
        async with OutputReader(kafka_bootstrap, topics) as reader:
            await produce(
                kafka_bootstrap,
                topics.requests,
                [
                    (b"conv-x", b"this is not json {"),
                    (b"conv-x", json.dumps({"request_id": "r-1", "input": "hi"}).encode()),
                    request_record("conv-x", "conv-x-0", "Hi", assistant_id="someone-else"),
                    request_record("conv-x", "conv-x-1", "Hello there"),
                ],
                headers=[("traceparent", b"00-abc-def-01")],
            )
            await reader.wait_for_responses(["conv-x-1"], 60)
            await reader.wait_for(lambda out: len(out.dlq) >= 3, 30, "three DLQ records")
            reasons = {}
            for record in reader.outputs.dlq:
                headers = dict(record.headers)
                reasons[record.value] = headers["dlq-reason"].decode()
                assert record.key == b"conv-x"
                assert headers["traceparent"] == b"00-abc-def-01"
                assert headers["dlq-source-topic"].decode() == topics.requests
            assert reasons[b"this is not json {"] == "not_json"
            assert (
                reasons[json.dumps({"request_id": "r-1", "input": "hi"}).encode()]
                == "missing_field"
            )
            assert reader.outputs.responses_by_request()["conv-x-1"][0]["status"] == "completed"
            metrics = worker.metrics()
            assert 'chat_worker_requests_total{outcome="invalid"} 3.0' in metrics
            assert 'chat_worker_requests_total{outcome="completed"} 1.0' in metrics
    finally:
        worker.terminate()
