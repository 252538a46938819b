"""Budgets: a conversation whose replies cost WORKER_CONVERSATION_BUDGET_USD gets no more calls.

Real broker, simulator and worker processes. The table keeps each conversation's spend (the
``cost`` of its completed replies); once it reaches the budget, further requests fail with
``budget_exceeded`` and no Vapi call, ``reset_context`` included, and after a restart too (the
spend is in the changelog). Other conversations go on.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

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

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

SIM_ARGS = ("--first-token-latency-s", "0.02", "--inter-token-delay-s", "0.005")
#: Above one 20-token reply of the simulator (about 0.0002 USD), below two.
BUDGET = "0.0004"


async def test_a_conversation_over_its_budget_gets_no_more_vapi_calls(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, tmp_path: Path
) -> None:
    settings = {"WORKER_CONVERSATION_BUDGET_USD": BUDGET}
    worker = WorkerProcess(kafka_bootstrap, topics, simulator, tmp_path, **settings).start()
    try:
        await asyncio.to_thread(worker.wait_ready)
        async with OutputReader(kafka_bootstrap, topics) as reader:
            await produce(
                kafka_bootstrap,
                topics.requests,
                [
                    request_record("c-b", "b-1", "Hello there"),
                    request_record("c-b", "b-2", "Go on"),
                    request_record("c-b", "b-3", "And more"),
                    request_record("c-b", "b-4", "Start over", reset_context=True),
                    request_record("c-free", "free-1", "Hello there"),
                ],
            )
            ids = ["b-1", "b-2", "b-3", "b-4", "free-1"]
            await reader.wait_for_responses(ids, 60)
            responses = {r["request_id"]: r for r in reader.outputs.responses}
            first, second = responses["b-1"], responses["b-2"]
            assert first["status"] == second["status"] == "completed"
            spent = first["cost"]["usd"] + second["cost"]["usd"]
            assert first["cost"]["usd"] < float(BUDGET) <= spent, "the budget sits between"
            for refused in (responses["b-3"], responses["b-4"]):
                assert refused["status"] == "failed", refused
                assert refused["error"]["code"] == "budget_exceeded"
                assert refused["error"]["retryable"] is False
                assert refused["attempts"] == 0
                assert f"{spent:.6f} USD" in refused["error"]["message"]
            assert responses["free-1"]["status"] == "completed"
        metrics = parse_metrics(worker.metrics())
        assert metrics['chat_worker_requests_total{outcome="failed"}'] == 2
        assert metrics['chat_worker_requests_total{outcome="completed"}'] == 3
        assert worker.terminate() == 0, worker.log_tail()
        called = {call["request_id"] for call in simulator.calls()}
        assert called == {"b-1", "b-2", "free-1"}, "no Vapi call over the budget"

        # The spend is in the table's changelog: a new worker process refuses too.
        again = WorkerProcess(
            kafka_bootstrap, topics, simulator, tmp_path, name="again", **settings
        ).start()
        try:
            await asyncio.to_thread(again.wait_ready)
            async with OutputReader(kafka_bootstrap, topics) as reader:
                await produce(
                    kafka_bootstrap,
                    topics.requests,
                    [
                        request_record("c-b", "b-5", "Still there?"),
                        request_record("c-free", "free-2", "Again"),
                    ],
                )
                await reader.wait_for_responses(["b-5", "free-2"], 60)
                responses = {r["request_id"]: r for r in reader.outputs.responses}
                assert responses["b-5"]["error"]["code"] == "budget_exceeded", responses["b-5"]
                assert responses["free-2"]["status"] == "completed"
                assert responses["free-2"]["previous_chat_id"] == responses["free-1"]["chat_id"]
            metrics = parse_metrics(again.metrics())
            assert metrics['chat_worker_requests_total{outcome="failed"}'] == 1
            assert metrics['chat_worker_requests_total{outcome="completed"}'] == 1
        finally:
            assert again.terminate() == 0, again.log_tail()
        assert "b-5" not in {call["request_id"] for call in simulator.calls()}
    finally:
        if worker.proc is not None and worker.proc.poll() is None:
            worker.kill()
