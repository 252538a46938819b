"""What each reply cost, and whether it is complete: real broker, simulator, worker processes.

After every stream the worker fetches the chat (``GET /chat/{id}``): the response carries its
``cost``; a stream that ended cleanly before the reply did (the simulator's ``truncate`` fault, a
proxy closing early) is caught by comparing with the chat's output; a fetch that fails never
fails the request.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.harness import (
    SIM_KEY,
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


def _chat(simulator: SimulatorProcess, chat_id: str) -> dict[str, Any]:
    response = httpx.get(
        f"{simulator.base_url}/chat/{chat_id}",
        headers={"Authorization": f"Bearer {SIM_KEY}"},
        timeout=10,
    )
    response.raise_for_status()
    chat: dict[str, Any] = response.json()
    return chat


async def test_each_reply_carries_its_cost_and_a_short_stream_is_repaired(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, tmp_path: Path
) -> None:
    """Cost from the chat; a truncated stream gets Vapi's text and is chained; failed fetches
    are retried and never fail the request."""
    worker = WorkerProcess(kafka_bootstrap, topics, simulator, tmp_path).start()
    try:
        await asyncio.to_thread(worker.wait_ready)
        async with OutputReader(kafka_bootstrap, topics) as reader:
            await produce(
                kafka_bootstrap,
                topics.requests,
                [
                    request_record("c-paid", "paid-1", "Hello there"),
                    request_record("c-cut", "cut-1", "[[sim:fault truncate after=3]] Tell me"),
                    request_record("c-cut", "cut-2", "And then?"),
                    request_record("c-flaky", "flaky-1", "hi [[sim:fault fetch code=503 gets=2]]"),
                    request_record("c-down", "down-1", "hi [[sim:fault fetch code=500]]"),
                ],
            )
            ids = ["paid-1", "cut-1", "cut-2", "flaky-1", "down-1"]
            await reader.wait_for_responses(ids, 90)
            await asyncio.sleep(1)  # a duplicate response would show up by now
            out = reader.outputs
            by_request = {rid: responses for rid, responses in out.responses_by_request().items()}
            assert {rid: len(by_request[rid]) for rid in ids} == dict.fromkeys(ids, 1)
            responses = {rid: by_request[rid][0] for rid in ids}

            paid = responses["paid-1"]
            chat = _chat(simulator, paid["chat_id"])
            [model] = chat["costs"]
            assert paid["status"] == "completed", paid
            assert paid["cost"] == {
                "usd": pytest.approx(chat["cost"]),
                "prompt_tokens": model["promptTokens"],
                "completion_tokens": model["completionTokens"],
            }
            assert paid["cost"]["usd"] > 0
            assert paid["stream_complete"] is True
            assert paid["text"] == "".join(d["delta"] for d in out.deltas_of("paid-1"))

            cut = responses["cut-1"]
            cut_chat = _chat(simulator, cut["chat_id"])
            streamed = "".join(d["delta"] for d in out.deltas_of("cut-1"))
            assert cut["status"] == "completed", cut
            assert cut["stream_complete"] is False
            assert cut["text"] == cut_chat["output"][0]["content"]
            assert len(streamed) < len(cut["text"])
            assert cut["text"].startswith(streamed)
            assert cut["delta_count"] == 3
            assert cut["cost"]["usd"] == pytest.approx(cut_chat["cost"])
            # Vapi's chat is whole: the next turn continues from it.
            assert responses["cut-2"]["previous_chat_id"] == cut["chat_id"]
            assert responses["cut-2"]["stream_complete"] is True

            flaky = responses["flaky-1"]
            assert flaky["status"] == "completed", flaky
            assert flaky["cost"] is not None
            assert flaky["stream_complete"] is True

            down = responses["down-1"]
            assert down["status"] == "completed", down
            assert down["cost"] is None
            assert down["stream_complete"] is None
            assert down["text"] == "".join(d["delta"] for d in out.deltas_of("down-1"))
        fetch_failures = [
            r for r in worker.log_records() if r.get("event") == "fetching the chat failed"
        ]
        assert [r["http_status"] for r in fetch_failures if r["chat_id"] == flaky["chat_id"]] == [
            503,
            503,
        ]
        tries_down = [r for r in fetch_failures if r["chat_id"] == down["chat_id"]]
        assert len(tries_down) == 5
        assert tries_down[-1]["giving_up"] is True
        metrics = parse_metrics(worker.metrics())
        paid_usd = sum(responses[rid]["cost"]["usd"] for rid in ids if responses[rid]["cost"])
        assert metrics["chat_worker_cost_usd_total"] == pytest.approx(paid_usd)
        prompt = sum(
            responses[rid]["cost"]["prompt_tokens"] for rid in ids if responses[rid]["cost"]
        )
        assert metrics['chat_worker_tokens_total{kind="prompt"}'] == prompt
        assert metrics['chat_worker_reply_checks_total{result="complete"}'] == 3
        assert metrics['chat_worker_reply_checks_total{result="incomplete"}'] == 1
        assert metrics['chat_worker_reply_checks_total{result="unchecked"}'] == 1
        assert metrics['chat_worker_requests_total{outcome="completed"}'] == 5
        print("cost figures of the run:", {rid: responses[rid]["cost"] for rid in ids})
    finally:
        assert worker.terminate() == 0, worker.log_tail()


async def test_fetching_the_chat_can_be_switched_off(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, tmp_path: Path
) -> None:
    """``VAPI_FETCH_CHAT=false``: no GET, no cost, the stream's text as it came."""
    worker = WorkerProcess(
        kafka_bootstrap, topics, simulator, tmp_path, VAPI_FETCH_CHAT="false"
    ).start()
    try:
        await asyncio.to_thread(worker.wait_ready)
        async with OutputReader(kafka_bootstrap, topics) as reader:
            await produce(
                kafka_bootstrap,
                topics.requests,
                [request_record("c-off", "off-1", "[[sim:fault truncate after=2]] hi")],
            )
            await reader.wait_for_responses(["off-1"], 60)
            [response] = reader.outputs.responses
            assert response["status"] == "completed"
            assert response["cost"] is None
            assert response["stream_complete"] is None
            assert response["text"] == "Reply to: "
        metrics = parse_metrics(worker.metrics())
        assert metrics["chat_worker_cost_usd_total"] == 0
        assert metrics['chat_worker_reply_checks_total{result="unchecked"}'] == 0
    finally:
        assert worker.terminate() == 0, worker.log_tail()
