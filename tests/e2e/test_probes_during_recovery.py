"""The ops endpoints while a worker recovers its table: up from the start, ready only once done.

Kubernetes' startup and liveness probes read ``/healthz``; a pod whose table takes longer to
recover than the startup probe's budget must still answer it, or it is killed before it is ever
ready (and again on every restart). ``/readyz`` says what the pod is still waiting for.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.harness import (
    SimulatorProcess,
    Topics,
    WorkerProcess,
    fill_changelog,
    parse_metrics,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

PARTITIONS = 4
#: Enough values that the replay is not over in an instant.
CONVERSATIONS = 20_000


async def test_healthz_answers_while_the_table_recovers_and_readyz_says_so(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, tmp_path: Path
) -> None:
    """With 20,000 conversations on the changelog, /healthz answers 200 while /readyz is 503
    with ``recovered`` false; then /readyz turns 200 and every conversation is in the table."""
    await fill_changelog(kafka_bootstrap, topics, PARTITIONS, CONVERSATIONS)
    worker = WorkerProcess(
        kafka_bootstrap, topics, simulator, tmp_path, TOPIC_PARTITIONS=str(PARTITIONS)
    ).start()
    base = f"http://127.0.0.1:{worker.http_port}"
    # (healthz status, readyz status, readyz checks) of each poll that got both answers.
    seen: list[tuple[int, int, dict[str, bool]]] = []
    try:
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                assert worker.proc is not None
                assert worker.proc.poll() is None, worker.log_tail()
                try:
                    health = await http.get("/healthz")
                    ready = await http.get("/readyz")
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
                    continue
                seen.append((health.status_code, ready.status_code, ready.json()["checks"]))
                if ready.status_code == 200:
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail(f"never ready:\n{worker.log_tail()}")
            metrics = parse_metrics((await http.get("/metrics")).text)
    finally:
        worker.terminate()

    recovering = [
        (health, ready) for health, ready, checks in seen if checks.get("recovered") is False
    ]
    assert recovering, f"the ops endpoints first answered once the table was recovered: {seen[:3]}"
    assert all(health == 200 and ready == 503 for health, ready in recovering), recovering
    assert seen[-1][:2] == (200, 200)
    assert metrics["chat_worker_conversations"] == CONVERSATIONS
