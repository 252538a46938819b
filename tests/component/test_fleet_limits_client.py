"""``LimitedVapiClient`` against the real simulator: what each call's end tells the fleet limits.

A 429 (the organisation's limit, with Retry-After) cuts the concurrency limit; streams that end
normally raise it again once the pause is over; a stream the caller abandons counts as neither.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from worker.errors import VapiRateLimitedError
from worker.fleet_limits import FleetLimits, LimitedVapiClient
from worker.metrics import WorkerMetrics
from worker.simulator.server import RunningSimulator, SimulatorConfig, serve_simulator
from worker.vapi.client import VapiClient, VapiTimeouts

pytestmark = pytest.mark.component

KEY = "sk-test-fleet-0123456789"
ROOMY = VapiTimeouts(connect_s=2, first_delta_s=5, stall_s=5, request_s=10)


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    """An organisation that answers one chat at once; over it, 429 with Retry-After: 1."""
    config = SimulatorConfig(
        api_key=KEY,
        first_token_latency_s=0,
        inter_token_delay_s=0,
        max_chats=1,
        max_chats_retry_after_s=1.0,
    )
    async with serve_simulator(config, port=0) as running:
        yield running


def body(text: str) -> dict[str, object]:
    return {"assistantId": "sim-assistant", "input": text, "stream": True}


async def run_to_end(client: LimitedVapiClient, text: str, request_id: str) -> str:
    parts = []
    stream = client.stream_chat(body(text), request_id=request_id, attempt=1)
    async with contextlib.aclosing(stream):
        async for event in stream:
            parts.append(event.delta)
    return "".join(parts)


async def test_a_429_cuts_the_limit_and_successes_after_the_pause_raise_it(
    sim: RunningSimulator,
) -> None:
    metrics = WorkerMetrics(CollectorRegistry())
    limits = FleetLimits(
        local_max_in_flight=8,
        global_max_in_flight=0,
        global_requests_per_minute=0,
        retry_after_max_s=60,
        metrics=metrics,
    )
    applied: list[int] = []
    limits.on_limit(applied.append)
    async with VapiClient(sim.base_url, SecretStr(KEY), ROOMY) as vapi:
        client = LimitedVapiClient(vapi, limits)
        slow = "x [[sim:pace first_ms=300 delay_ms=1 tokens=2]]"
        holder = asyncio.create_task(run_to_end(client, slow, "holder"))
        await asyncio.sleep(0.1)
        with pytest.raises(VapiRateLimitedError) as refused:
            await run_to_end(client, "over the limit", "refused")
        assert refused.value.retry_after_s == pytest.approx(1.0)
        assert applied == [8, 4]
        await holder  # started before the cut: its success, inside the pause, raises nothing
        assert applied == [8, 4]

        await asyncio.sleep(1.0)  # the Retry-After pause is over
        # A stream abandoned half-way is no success.
        stream = client.stream_chat(body("y"), request_id="abandoned", attempt=1)
        async with contextlib.aclosing(stream):
            async for _ in stream:
                break
        for n in range(3):
            assert await run_to_end(client, f"turn {n}", f"ok-{n}")
        assert applied == [8, 4]
        assert await run_to_end(client, "turn 3", "ok-3")  # the 4th success at a limit of 4
    assert applied == [8, 4, 5]
    assert metrics.registry.get_sample_value("chat_worker_concurrency_limit") == 5
