"""The operations HTTP server against real sockets on 127.0.0.1: metrics, liveness, readiness."""

from __future__ import annotations

import asyncio
import os
import shutil
from asyncio.subprocess import PIPE, STDOUT
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from worker.metrics import WorkerMetrics
from worker.ops_http import OpsServer

pytestmark = pytest.mark.component


class Probe:
    """Mutable readiness, liveness and dependency state that the tests flip."""

    def __init__(self) -> None:
        self.checks = {"started": True, "assigned": True, "recovered": True}
        self.shared = {"broker": True, "vapi_auth": True}
        self.alive = True
        self.fail = False
        self.fail_dependencies = False

    def readiness(self) -> dict[str, bool]:
        """The current checks, or an error when told to fail."""
        if self.fail:
            raise RuntimeError("consumer gone")
        return dict(self.checks)

    def liveness(self) -> bool:
        """Whether the process says it is alive."""
        return self.alive

    def dependencies(self) -> dict[str, bool]:
        """What every pod shares, or an error when told to fail."""
        if self.fail_dependencies:
            raise RuntimeError("probe broken")
        return dict(self.shared)


@pytest.fixture
def probe() -> Probe:
    """Fresh probe state per test."""
    return Probe()


@pytest.fixture
def metrics() -> WorkerMetrics:
    """Worker metrics on a fresh registry."""
    return WorkerMetrics(CollectorRegistry())


@pytest.fixture
async def server(metrics: WorkerMetrics, probe: Probe) -> AsyncIterator[OpsServer]:
    """A started server on an ephemeral loopback port, stopped after the test."""
    ops = OpsServer(
        metrics.registry,
        probe.readiness,
        "127.0.0.1",
        0,
        liveness=probe.liveness,
        dependencies=probe.dependencies,
    )
    await ops.start()
    yield ops
    await ops.stop()


@pytest.fixture
async def client(server: OpsServer) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client pointed at the server."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=5) as c:
        yield c


async def test_port_zero_binds_an_ephemeral_port(server: OpsServer) -> None:
    """Asking for port 0 yields the real bound port through ``port``."""
    assert server.port > 0


async def test_metrics_serves_the_registry_in_text_format(
    client: httpx.AsyncClient, metrics: WorkerMetrics
) -> None:
    """/metrics returns Prometheus' text format with the current values of the registry."""
    metrics.requests_total.labels(outcome="completed").inc(2)
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    requests = families["chat_worker_requests"]
    values = {s.labels["outcome"]: s.value for s in requests.samples if s.name.endswith("_total")}
    assert values == {
        "completed": 2,
        "failed": 0,
        "expired": 0,
        "cancelled": 0,
        "invalid": 0,
        "duplicate": 0,
    }


async def test_metrics_negotiates_openmetrics(client: httpx.AsyncClient) -> None:
    """A scraper asking for OpenMetrics gets it, terminated by # EOF."""
    response = await client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")


async def test_healthz_is_200_while_alive(client: httpx.AsyncClient) -> None:
    """/healthz answers 200 while the loop runs and the liveness callable agrees."""
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"alive": True, "dependencies": {"broker": True, "vapi_auth": True}}


async def test_healthz_is_503_when_liveness_says_no(
    client: httpx.AsyncClient, probe: Probe
) -> None:
    """/healthz answers 503 when the liveness callable reports the process stuck."""
    probe.alive = False
    response = await client.get("/healthz")
    assert response.status_code == 503


async def test_readyz_is_200_when_every_check_passes(client: httpx.AsyncClient) -> None:
    """/readyz answers 200 with all checks listed when all are true."""
    response = await client.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["ready"] is True
    assert body["failing"] == []
    assert set(body["checks"]) == {"started", "assigned", "recovered"}
    assert body["dependencies"] == {"broker": True, "vapi_auth": True}


async def test_readyz_is_503_naming_what_is_not_ready(
    client: httpx.AsyncClient, probe: Probe
) -> None:
    """/readyz answers 503 and names each failing check in its JSON body."""
    probe.checks["recovered"] = False
    probe.checks["assigned"] = False
    response = await client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["ready"] is False
    assert body["failing"] == ["assigned", "recovered"]
    assert body["checks"]["started"] is True


async def test_failing_dependencies_are_reported_but_fail_neither_probe(
    client: httpx.AsyncClient, probe: Probe
) -> None:
    """An unreachable broker or a refused key shows in both bodies; both still answer 200."""
    probe.shared = {"broker": False, "vapi_auth": False}
    ready = await client.get("/readyz")
    health = await client.get("/healthz")
    assert ready.status_code == 200
    assert ready.json()["ready"] is True
    assert ready.json()["dependencies"] == {"broker": False, "vapi_auth": False}
    assert health.status_code == 200
    assert health.json()["dependencies"] == {"broker": False, "vapi_auth": False}


async def test_a_dependencies_callable_that_raises_fails_neither_probe(
    client: httpx.AsyncClient, probe: Probe
) -> None:
    """Reporting is best effort: an error there leaves the dependencies empty, the status 200."""
    probe.fail_dependencies = True
    for path in ("/readyz", "/healthz"):
        response = await client.get(path)
        assert response.status_code == 200, path
        assert response.json()["dependencies"] == {}, path


async def test_readyz_is_503_when_the_readiness_callable_raises(
    client: httpx.AsyncClient, probe: Probe
) -> None:
    """A readiness callable that raises makes the worker unready instead of erroring."""
    probe.fail = True
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["error"] == "RuntimeError"


async def test_readyz_reports_the_info_beside_the_checks_without_deciding_readiness(
    metrics: WorkerMetrics, probe: Probe
) -> None:
    """``info`` (e.g. a 429 backoff) shows in the body; only the checks decide 200 or 503."""
    state: dict[str, object] = {"vapi_backoff_s": 42.5}
    ops = OpsServer(metrics.registry, probe.readiness, "127.0.0.1", 0, info=lambda: dict(state))
    await ops.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ops.port}", timeout=5) as http:
            ready = await http.get("/readyz")
            assert ready.status_code == 200
            assert ready.json()["info"] == {"vapi_backoff_s": 42.5}
            probe.checks["broker"] = False
            unready = await http.get("/readyz")
            assert unready.status_code == 503
            assert unready.json()["info"] == {"vapi_backoff_s": 42.5}
    finally:
        await ops.stop()


async def test_probes_are_not_cached(client: httpx.AsyncClient) -> None:
    """Every endpoint tells proxies not to cache its answer."""
    for path in ("/metrics", "/healthz", "/readyz"):
        response = await client.get(path)
        assert response.headers["cache-control"] == "no-store"


async def test_unknown_path_is_404(client: httpx.AsyncClient) -> None:
    """Nothing else is served (Faust's /table in particular)."""
    response = await client.get("/table")
    assert response.status_code == 404


async def test_stop_closes_the_port(metrics: WorkerMetrics, probe: Probe) -> None:
    """After stop() the port refuses connections, and a second stop() is harmless."""
    ops = OpsServer(metrics.registry, probe.readiness, "127.0.0.1", 0)
    await ops.start()
    port = ops.port
    await ops.stop()
    await ops.stop()
    async with httpx.AsyncClient(timeout=2) as c:
        with pytest.raises(httpx.ConnectError):
            await c.get(f"http://127.0.0.1:{port}/healthz")


async def test_start_twice_is_refused(server: OpsServer) -> None:
    """Starting a started server is a programming error."""
    with pytest.raises(RuntimeError, match="already started"):
        await server.start()


async def test_busy_port_fails_start_and_leaves_nothing_open(
    server: OpsServer, metrics: WorkerMetrics, probe: Probe
) -> None:
    """Binding a port in use raises OSError from start() and the server stays stopped."""
    clash = OpsServer(metrics.registry, probe.readiness, "127.0.0.1", server.port)
    with pytest.raises(OSError, match=r"(?i)address already in use"):
        await clash.start()
    await clash.stop()
    assert clash.port == server.port


async def test_metrics_output_passes_promtool(
    client: httpx.AsyncClient, metrics: WorkerMetrics
) -> None:
    """``promtool check metrics`` finds no problem in what /metrics serves, with every kind used."""
    promtool = shutil.which("promtool")
    if promtool is None:
        hint = "apt-get install -y --no-install-recommends prometheus"
        if os.environ.get("CI"):
            pytest.fail(f"promtool is not installed; CI must install it ({hint})")
        pytest.skip(f"promtool is not installed ({hint}); CI installs it")
    metrics.vapi_responses_total.labels(status="200").inc()
    metrics.vapi_responses_total.labels(status="error").inc()
    metrics.set_consumer_lag(0, 12)
    metrics.request_duration_seconds.observe(4.2)
    metrics.delta_publish_seconds.observe(0.002)
    body = (await client.get("/metrics")).content
    proc = await asyncio.create_subprocess_exec(
        promtool, "check", "metrics", stdin=PIPE, stdout=PIPE, stderr=STDOUT
    )
    output, _ = await asyncio.wait_for(proc.communicate(body), timeout=30)
    assert proc.returncode == 0, output.decode()
