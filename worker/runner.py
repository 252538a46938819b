"""Start the worker process: topics, the embedded simulator if asked for, ops server, Faust."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

import faust
import structlog
from prometheus_client import CollectorRegistry

from worker.app import Assembly, assemble
from worker.config import Settings
from worker.errors import ConfigError, RecoveryStalledError
from worker.kafka_adapters import RecoveryProgress, recovery_progress
from worker.logs import register_secret
from worker.metrics import WorkerMetrics
from worker.ops_http import OpsServer
from worker.recovery_watch import RecoveryWatch
from worker.simulator.server import SimulatorConfig, serve_simulator
from worker.topics import BrokerProbe, ensure_topics

log = structlog.get_logger(__name__)

#: Tasks started on the loop outside Faust's services, held until they end.
BACKGROUND: set[asyncio.Task[None]] = set()


def start_embedded_simulator(settings: Settings) -> str:
    """Serve the Vapi simulator on a free loopback port in a daemon thread; return its URL.

    It has its own event loop so that the worker's loop and its timeouts behave exactly as they
    would against the real API.
    """
    ready = threading.Event()
    found: dict[str, str] = {}
    config = SimulatorConfig(
        api_key=settings.simulator_api_key.get_secret_value(),
        first_token_latency_s=settings.simulator_first_token_latency_s,
        inter_token_delay_s=settings.simulator_inter_token_delay_s,
    )

    async def serve() -> None:
        async with serve_simulator(config, port=0) as simulator:
            found["url"] = simulator.base_url
            ready.set()
            await asyncio.Event().wait()

    threading.Thread(
        target=lambda: asyncio.run(serve()), name="vapi-simulator", daemon=True
    ).start()
    if not ready.wait(15):
        raise ConfigError("the embedded Vapi simulator did not start within 15 s")
    return found["url"]


def vapi_endpoint(settings: Settings) -> tuple[str, str]:
    """The Vapi base URL and key to use: the real API, a given URL, or the embedded simulator."""
    if settings.uses_embedded_simulator:
        url = start_embedded_simulator(settings)
        log.info("using the embedded Vapi simulator", url=url)
        return url, settings.simulator_api_key.get_secret_value()
    if settings.vapi_api_key is None:
        raise ConfigError("VAPI_BASE_URL is set but VAPI_API_KEY (or VAPI_API_KEY_FILE) is not")
    return settings.effective_vapi_base_url(), settings.vapi_api_key.get_secret_value()


def readiness(assembly: Assembly) -> Mapping[str, bool]:
    """What /readyz gates on: this pod's own ability to work. Started, assigned (no rebalance
    under way), table recovered. Nothing every pod shares: that is ``dependencies``."""
    app = assembly.app
    recovery = cast(Any, app.tables).recovery
    return {
        "started": bool(app.started),
        "assigned": not app.rebalancing,
        "recovered": recovery.completed.is_set(),
    }


def dependencies(assembly: Assembly, broker: BrokerProbe) -> Mapping[str, bool]:
    """What every pod shares, reported by /healthz and /readyz and never failing them: broker
    reachable, Vapi key accepted (also chat_worker_broker_reachable, chat_worker_vapi_ready)."""
    return {"broker": broker.reachable, "vapi_auth": assembly.vapi_auth_ok()}


def readiness_info(assembly: Assembly) -> Mapping[str, object]:
    """What /readyz shows beside its checks, without making the pod unready.

    A 429 backoff pauses every Vapi call of this worker, but the pod can still take records,
    publish and commit, and Vapi's limit is on the account, not the pod: another pod would be
    told the same. Unready pods would only stall a rollout (the PDB counts them), so the pause is
    shown here and in ``chat_worker_vapi_backoff_seconds``, and the checks stay as they are.
    """
    return {"vapi_backoff_s": round(assembly.vapi_backoff_s(), 3)}


def recovery_look_interval_s(stall_s: float) -> float:
    """How often the recovery watch looks: four looks per stall time, at least every 5 s."""
    return min(5.0, stall_s / 4)


async def watch_recovery(
    watch: RecoveryWatch,
    look: Callable[[], RecoveryProgress],
    metrics: WorkerMetrics,
    crash: Callable[[BaseException], Awaitable[None]],
) -> None:
    """Look at the table recovery every few seconds; on a stall, log it once, count it and
    crash the app, so that the process exits and the group reassigns its partitions.

    A recovery keeps the request partitions paused while /healthz answers 200, so nothing else
    would end a recovery that reads nothing (docs/design.md §9). A look that fails is logged and
    the watch goes on.
    """
    interval = recovery_look_interval_s(watch.stall_s)
    while True:
        await asyncio.sleep(interval)
        try:
            progress = look()
        except Exception:
            log.exception("reading the table recovery's progress failed")
            continue
        stall = watch.observe(
            time.monotonic(), progress.in_recovery, progress.remaining, progress.started_at
        )
        if stall is None:
            continue
        log.error(
            "table recovery stalled: exiting so that the consumer group reassigns the partitions",
            partitions=sorted(stall.remaining),
            records_left=stall.total,
            remaining=dict(stall.remaining),
            seconds_without_progress=round(stall.seconds, 1),
            worker_recovery_stall_s=watch.stall_s,
        )
        metrics.recovery_stalls_total.inc()
        await crash(
            RecoveryStalledError(
                f"table recovery made no progress for {stall.seconds:.0f} s with "
                f"{stall.total} records left on {', '.join(sorted(stall.remaining))}"
            )
        )
        return


def run_worker(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code (Faust exits the process)."""
    base_url, api_key = vapi_endpoint(settings)
    register_secret(api_key)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    partitions = loop.run_until_complete(ensure_topics(settings))
    # The table must have the request topic's partition count, which may not be TOPIC_PARTITIONS.
    settings = settings.model_copy(update={"topic_partitions": partitions})

    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    assembly = assemble(settings, metrics, vapi_base_url=base_url, vapi_api_key=api_key)
    broker = BrokerProbe(settings)
    ops = OpsServer(
        registry,
        lambda: readiness(assembly),
        port=settings.worker_http_port,
        dependencies=lambda: dependencies(assembly, broker),
        info=lambda: readiness_info(assembly),
    )

    async def check_broker() -> None:
        metrics.broker_reachable.set(1 if await broker.check() else 0)

    async def serve_ops() -> None:
        await check_broker()
        await ops.start()
        log.info("ops endpoints up", port=ops.port, paths=["/metrics", "/healthz", "/readyz"])

    # Up before Faust starts, on the loop Faust then runs: Faust starts an app's tasks and timers
    # only once its tables are recovered, and the startup and liveness probes must be answered
    # while they are (README, "Performance, measured"), with /readyz saying what is still to do.
    loop.run_until_complete(serve_ops())

    # Started before Faust for the same reason: the first recovery runs before any app timer.
    watch = RecoveryWatch(settings.worker_recovery_stall_s)
    if watch.enabled:
        task = loop.create_task(
            watch_recovery(
                watch, lambda: recovery_progress(assembly.app), metrics, assembly.app.crash
            ),
            name="recovery-watch",
        )
        BACKGROUND.add(task)  # held, so that the task is never collected
        task.add_done_callback(BACKGROUND.discard)

    @assembly.app.timer(interval=10.0)  # type: ignore[untyped-decorator]
    async def probe_broker() -> None:
        await check_broker()

    # Faust's process runner (mode's Worker): signals, logging, the event loop, the exit code.
    faust_runner = faust.Worker(
        assembly.app,
        loop=loop,
        loglevel=settings.log_level,
        quiet=True,
        override_logging=False,
        redirect_stdouts=False,
    )
    faust_runner.execute_from_commandline()
    return 0  # not reached: Faust exits the process
