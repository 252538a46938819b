"""Metrics and logs of a real run: the counters move by what happened, the logs say it once."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
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

SIM_ARGS = ("--first-token-latency-s", "0.02", "--inter-token-delay-s", "0.002")


def _sample(metrics: str, name: str, labels: str = "") -> float:
    """The value of one sample of the Prometheus text output (0 when absent)."""
    pattern = rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$"
    found = re.search(pattern, metrics, flags=re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def test_counters_move_by_what_the_run_did_and_logs_close_each_request(
    kafka_bootstrap: str, simulator: SimulatorProcess, unique_name: str, tmp_path: Path
) -> None:
    """After 12 good requests, 1 bad record and 1 redelivered request, /metrics and logs agree."""
    topics = Topics.unique(unique_name)
    worker = WorkerProcess(kafka_bootstrap, topics, simulator, tmp_path).start()
    try:
        worker.wait_ready()
        records = [
            request_record(f"conv-{n % 4}", f"conv-{n % 4}-{n}", f"Hello number {n}")
            for n in range(12)
        ]
        duplicate = records[0]
        async with OutputReader(kafka_bootstrap, topics) as reader:
            await produce(
                kafka_bootstrap, topics.requests, [*records, (b"conv-0", b"{oops"), duplicate]
            )
            await reader.wait_for_responses([f"conv-{n % 4}-{n}" for n in range(12)], 90)
            await reader.wait_for(lambda out: len(out.dlq) == 1, 30, "the DLQ record")
            outputs = reader.outputs
            deltas_on_topic = len(outputs.deltas)

        metrics = worker.metrics()
        # The duplicate is taken after the original's response; give its skip a moment to count.
        for _ in range(50):
            if _sample(metrics, "chat_worker_requests_total", '{outcome="duplicate"}') >= 1:
                break
            await asyncio.sleep(0.1)
            metrics = worker.metrics()
        assert _sample(metrics, "chat_worker_requests_total", '{outcome="completed"}') == 12
        assert _sample(metrics, "chat_worker_requests_total", '{outcome="invalid"}') == 1
        assert _sample(metrics, "chat_worker_requests_total", '{outcome="duplicate"}') == 1
        assert _sample(metrics, "chat_worker_requests_total", '{outcome="failed"}') == 0
        assert _sample(metrics, "chat_worker_deltas_total") == deltas_on_topic > 0
        assert _sample(metrics, "chat_worker_vapi_responses_total", '{status="200"}') == 12
        assert _sample(metrics, "chat_worker_dlq_total", '{reason="not_json"}') == 1
        assert _sample(metrics, "chat_worker_in_flight") == 0
        assert _sample(metrics, "chat_worker_time_to_first_delta_seconds_count") == 12
        assert _sample(metrics, "chat_worker_request_duration_seconds_count") == 12
        assert _sample(metrics, "chat_worker_delta_publish_seconds_count") == deltas_on_topic
        assert _sample(metrics, "chat_worker_vapi_ready") == 1
        assert "conv-0" not in metrics  # no conversation or request ids in labels
    finally:
        worker.terminate()

    lines = [
        json.loads(line)
        for line in worker.log_path.read_text().splitlines()
        if line.startswith("{")
    ]
    finished = [line for line in lines if line.get("event") == "request finished"]
    assert sorted(line["request_id"] for line in finished) == sorted(
        f"conv-{n % 4}-{n}" for n in range(12)
    )
    for line in finished:
        assert line["conversation_id"] == line["request_id"].rsplit("-", 1)[0]
        assert line["attempt"] == 1
        assert line["outcome"] == "completed"
        assert {"queued_ms", "first_delta_ms", "total_ms"} <= line.keys()
    # No line per delta at the default level: far fewer lines than deltas.
    per_request = [line for line in lines if line.get("request_id")]
    assert len(per_request) < deltas_on_topic / 2


async def test_a_rejected_key_keeps_the_pod_ready_and_shows_in_metrics_and_dependencies(
    kafka_bootstrap: str, simulator: SimulatorProcess, unique_name: str, tmp_path: Path
) -> None:
    """A key Vapi refuses, read from VAPI_API_KEY_FILE, fails the request with a 401 and shows as
    chat_worker_vapi_ready 0 and dependencies.vapi_auth false, while /readyz stays 200: the key is
    shared by every pod, so it must not take them all out of service at once."""
    key_file = tmp_path / "vapi-api-key"
    key_file.write_text("not-the-simulator-key\n")
    topics = Topics.unique(unique_name)
    worker = WorkerProcess(
        kafka_bootstrap, topics, simulator, tmp_path, VAPI_API_KEY_FILE=str(key_file)
    )
    del worker.env["VAPI_API_KEY"]  # the file is the only source, as in the k8s Deployment
    worker.start()
    try:
        worker.wait_ready()
        async with OutputReader(kafka_bootstrap, topics) as reader:
            await produce(
                kafka_bootstrap, topics.requests, [request_record("conv-k", "conv-k-1", "Hello?")]
            )
            await reader.wait_for_responses(["conv-k-1"], 60)
            (response,) = reader.outputs.responses
        assert response["status"] == "failed"
        assert response["error"]["http_status"] == 401
        metrics = worker.metrics()
        assert _sample(metrics, "chat_worker_vapi_ready") == 0
        assert _sample(metrics, "chat_worker_broker_reachable") == 1
        base = f"http://127.0.0.1:{worker.http_port}"
        async with httpx.AsyncClient(base_url=base, timeout=5) as http:
            ready = await http.get("/readyz")
            health = await http.get("/healthz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["dependencies"] == {"broker": True, "vapi_auth": False}
        assert health.status_code == 200, health.text
        assert health.json()["dependencies"] == {"broker": True, "vapi_auth": False}
    finally:
        worker.terminate()
