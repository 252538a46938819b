"""One scenario: the worker on the whole load, the baseline on a slice, the raw ceiling.

For the worker and the baseline alike: fresh topics, the load produced into the request topic
*before* the process starts (a backlog), a fresh simulator, the reader on the output topics, then
the process; the run ends when every request has a response (or fails on a timeout or an exit).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]  # no stubs in the dev extras

from bench.check import RequestSpec, build_load, percentile, slice_load, verify
from bench.kafka import OutputReader, Topics, create_topics, produce, raw_ceiling
from bench.procs import SIM_KEY, Sampler, ServiceProcess, Simulator, free_port, machine_probe
from bench.scenarios import WARM_UP, Scenario


class BenchFailure(Exception):
    """The run could not finish or its outputs are wrong: the bench exits 1."""


@dataclass(frozen=True)
class Context:
    """What every run of one invocation shares."""

    bootstrap: str
    run_id: str
    run_dir: Path
    profile_worker: bool = False
    worker_env: dict[str, str] = field(default_factory=dict)
    timeout_s: float | None = None
    #: The broker's pid when this invocation started it (its CPU is then counted as ours).
    broker_pid: int | None = None


@dataclass
class SystemResult:
    """The measurements of one system (worker or baseline) on its load."""

    system: str
    requests: int
    deltas: int
    window_s: float
    requests_per_s: float
    deltas_per_s: float
    peak_streams_in_flight: int
    latency_p50_ms: float
    latency_p99_ms: float
    latency_max_ms: float
    receive_p50_ms: float
    receive_p99_ms: float
    publish_p50_ms: float
    publish_p99_ms: float
    cpu_s_per_1000_deltas: float
    cpu_s: float
    peak_rss_mib: float
    simulator_cpu_s: float
    #: CPU of the broker (when the bench started it) and of the bench process (the reader).
    broker_cpu_s: float | None
    bench_cpu_s: float
    #: Cores the whole machine was busy on average, and the part of it other processes took.
    machine_busy_cores: float
    other_processes_cores: float
    retried_requests: int
    mean_delta_bytes: float
    log: str


@dataclass
class CeilingResult:
    """The bare aiokafka producer on the same number of delta-sized records."""

    records: int
    record_bytes: int
    seconds: float
    deltas_per_s: float
    producer_cpu_s: float
    broker_cpu_s: float | None


@dataclass
class ScenarioResult:
    scenario: Scenario
    worker: SystemResult
    baseline: SystemResult | None
    ceiling: CeilingResult | None

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": asdict(self.scenario),
            "worker": asdict(self.worker),
            "baseline": None if self.baseline is None else asdict(self.baseline),
            "ceiling": None if self.ceiling is None else asdict(self.ceiling),
        }


def say(message: str) -> None:
    """Progress, on stderr (the table goes to stdout)."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


async def run_scenario(ctx: Context, scenario: Scenario) -> ScenarioResult:
    """Run the worker, the baseline and the ceiling for one scenario."""
    say(f"scenario {scenario.name}: {scenario.describe()}")
    load = build_load(scenario.requests, scenario.conversations)
    worker = await run_system(ctx, scenario, "worker", load)
    baseline = None
    if scenario.baseline_fraction > 0:
        part = slice_load(load, scenario.conversations, scenario.baseline_fraction)
        baseline = await run_system(ctx, scenario, "baseline", part)
    ceiling = await run_ceiling(ctx, scenario, load, round(worker.mean_delta_bytes))
    return ScenarioResult(scenario, worker, baseline, ceiling)


async def warm_up(ctx: Context) -> None:
    """Put a fresh broker through the whole pipeline once, untimed, before anything is measured.

    A just-started broker's JVM compiles its hot paths on its first traffic. A broker in service
    has long done that; one started for the bench would do it while the worker is measured, on
    the cores the worker, the simulator and the reader share. (``scripts/local-kafka.sh`` keeps
    that short by running C1 only; see its ``LOCAL_KAFKA_JIT``.) So every path the runs use
    goes through the broker first: the worker on a small fast load, then the bare producer.
    """
    started = time.monotonic()
    load = build_load(WARM_UP.requests, WARM_UP.conversations)
    await run_system(ctx, WARM_UP, "worker", load)
    await run_ceiling(ctx, WARM_UP, load, 160)
    say(f"broker warmed up in {time.monotonic() - started:.1f} s")


def _argv(ctx: Context, system: str, tag: str) -> list[str]:
    if system == "baseline":
        return [sys.executable, "-m", "bench.baseline"]
    if ctx.profile_worker:
        profile = ctx.run_dir / f"{tag}.prof"
        say(f"profiling the worker (cProfile, main-thread CPU clock) into {profile}")
        return [sys.executable, "-m", "bench.profiler", str(profile), "-m", "worker", "run"]
    return [sys.executable, "-m", "worker", "run"]


def _timeout_s(ctx: Context, scenario: Scenario, system: str, load: Sequence[RequestSpec]) -> float:
    if ctx.timeout_s is not None:
        return ctx.timeout_s
    per_request_s = (
        scenario.first_token_latency_ms
        + scenario.reply_tokens * (scenario.inter_token_delay_ms + 5)
    ) / 1000
    turns = max(spec.turn for spec in load)
    serial = len(load) if system == "baseline" else turns
    return 120 + 3 * serial * per_request_s + len(load) * scenario.reply_tokens / 1000


async def run_system(
    ctx: Context, scenario: Scenario, system: str, load: Sequence[RequestSpec]
) -> SystemResult:
    """Run ``system`` ("worker" or "baseline") on ``load``; check and measure its outputs."""
    tag = f"{ctx.run_id}-{scenario.name}-{system}"
    topics = Topics.unique(tag)
    await create_topics(
        ctx.bootstrap,
        [topics.requests, topics.deltas, topics.responses, topics.dlq],
        scenario.partitions,
    )
    await produce(ctx.bootstrap, topics.requests, (spec.record() for spec in load))
    say(f"{scenario.name}/{system}: {len(load)} requests loaded into {topics.requests}")
    simulator = await asyncio.to_thread(
        Simulator(scenario.pacing, ctx.run_dir / f"{tag}-simulator.log").start
    )
    watch = _Watch.start(ctx)
    try:
        with _no_collector_pauses():
            outputs, records, process = await _run_process(
                ctx, scenario, system, tag, topics, simulator, load
            )
    finally:
        await asyncio.to_thread(simulator.stop)
        watch.stop()
    return _measure(scenario, system, load, outputs, records, process, simulator, watch)


async def _run_process(
    ctx: Context,
    scenario: Scenario,
    system: str,
    tag: str,
    topics: Topics,
    simulator: Simulator,
    load: Sequence[RequestSpec],
) -> tuple[Any, SimRecords, ServiceProcess]:
    """Start ``system`` with the reader on its outputs; return once every response is read."""
    async with OutputReader(ctx.bootstrap, topics) as reader:
        process = ServiceProcess(
            _argv(ctx, system, tag),
            _environment(ctx, scenario, topics, simulator, system),
            ctx.run_dir / f"{tag}.log",
            system,
        ).start()
        try:
            started = time.monotonic()
            await _wait_for_responses(
                reader, process, len(load), _timeout_s(ctx, scenario, system, load)
            )
            say(
                f"{scenario.name}/{system}: all {len(load)} responses read after "
                f"{time.monotonic() - started:.1f} s"
            )
            await asyncio.sleep(0.3)  # one more CPU/RSS sample after the last response
            records = await asyncio.to_thread(_simulator_records, simulator)
        finally:
            code = await asyncio.to_thread(process.stop)
            if code not in (0, -15, None):
                say(f"{system} exited with {code}; log: {process.log_path}")
        return reader.outputs, records, process


@contextlib.contextmanager
def _no_collector_pauses() -> Iterator[None]:
    """No cyclic garbage collection in this process while it times outputs or the ceiling.

    The reader keeps every output record for the checks, which a downstream consumer would not:
    with 100,000 of them a full collection paused this process for 50 ms and more, and every
    delta read in that pause was timed late. Collected once the run is over.
    """
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


def _environment(
    ctx: Context, scenario: Scenario, topics: Topics, simulator: Simulator, system: str
) -> dict[str, str]:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": ctx.bootstrap,
        "VAPI_BASE_URL": simulator.base_url,
        "VAPI_API_KEY": SIM_KEY,
        "VAPI_ASSISTANT_ID": "sim-assistant",
        "TOPIC_PARTITIONS": str(scenario.partitions),
        "WORKER_HTTP_PORT": str(free_port()),
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
        **topics.env(),
    }
    if system == "worker":
        env.update(ctx.worker_env)
    return env


async def _wait_for_responses(
    reader: OutputReader, process: ServiceProcess, expected: int, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    last_report = time.monotonic()
    while reader.responded() < expected:
        if (error := reader.failed()) is not None:
            raise BenchFailure(f"the output reader failed: {error!r}")
        if (code := process.exited()) is not None:
            raise BenchFailure(
                f"{process.name} exited with {code} after {reader.responded()}/{expected} "
                f"responses; its log ends:\n{process.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise BenchFailure(
                f"{process.name}: only {reader.responded()}/{expected} responses after "
                f"{timeout_s:.0f} s; log: {process.log_path}"
            )
        if time.monotonic() - last_report > 10:
            last_report = time.monotonic()
            say(
                f"{process.name}: {reader.responded()}/{expected} responses, "
                f"{len(reader.outputs.deltas)} deltas read"
            )
        await asyncio.sleep(0.05)


def _simulator_records(
    simulator: Simulator,
) -> tuple[dict[str, Any], dict[str, list[float]], list[dict[str, Any]]]:
    return (
        simulator.get("/_sim/stats"),
        simulator.get("/_sim/delta-times"),
        simulator.get("/_sim/calls"),
    )


@dataclass
class _Watch:
    """Samplers of the machine, the bench process itself and (when ours) the broker."""

    machine: Sampler
    bench: Sampler
    broker: Sampler | None

    @classmethod
    def start(cls, ctx: Context) -> _Watch:
        broker = None
        if ctx.broker_pid is not None:
            with contextlib.suppress(psutil.Error):
                broker = Sampler.of_process(ctx.broker_pid).start()
        return cls(
            Sampler(machine_probe, "machine").start(),
            Sampler.of_process(os.getpid()).start(),
            broker,
        )

    def stop(self) -> None:
        for sampler in (self.machine, self.bench, self.broker):
            if sampler is not None:
                sampler.stop()


SimRecords = tuple[dict[str, Any], dict[str, list[float]], list[dict[str, Any]]]


def _measure(
    scenario: Scenario,
    system: str,
    load: Sequence[RequestSpec],
    outputs: Any,
    records: SimRecords,
    process: ServiceProcess,
    simulator: Simulator,
    watch: _Watch,
) -> SystemResult:
    stats, times, calls = records
    verdict = verify(
        load,
        outputs.deltas,
        outputs.responses,
        outputs.dead_letters,
        calls,
        times,
        scenario.reply_tokens,
        contract=system == "worker",
    )
    if verdict.errors:
        raise BenchFailure(
            f"{scenario.name}/{system}: the outputs are wrong:\n  " + "\n  ".join(verdict.errors)
        )
    assert verdict.first_call_at is not None
    assert verdict.last_response_at is not None
    window = verdict.window_s
    assert process.sampler is not None
    assert simulator.sampler is not None
    start, end = verdict.first_call_at, verdict.last_response_at
    cpu = process.sampler.cpu_between(start, end)
    sim_cpu = simulator.sampler.cpu_between(start, end)
    bench_cpu = watch.bench.cpu_between(start, end)
    broker_cpu = None if watch.broker is None else watch.broker.cpu_between(start, end)
    machine_cpu = watch.machine.cpu_between(start, end)
    others = machine_cpu - cpu - sim_cpu - bench_cpu - (broker_cpu or 0.0)
    latencies = verdict.latencies_s
    say(f"{scenario.name}/{system}: correct ({len(load)} responses, {verdict.deltas} deltas)")
    return SystemResult(
        system=system,
        requests=len(load),
        deltas=verdict.deltas,
        window_s=round(window, 3),
        requests_per_s=len(load) / window,
        deltas_per_s=verdict.deltas / window,
        peak_streams_in_flight=int(stats["peak_streams_in_flight"]),
        latency_p50_ms=percentile(latencies, 0.50) * 1000,
        latency_p99_ms=percentile(latencies, 0.99) * 1000,
        latency_max_ms=max(latencies, default=0.0) * 1000,
        receive_p50_ms=percentile(verdict.receive_latencies_s, 0.50) * 1000,
        receive_p99_ms=percentile(verdict.receive_latencies_s, 0.99) * 1000,
        publish_p50_ms=percentile(verdict.publish_latencies_s, 0.50) * 1000,
        publish_p99_ms=percentile(verdict.publish_latencies_s, 0.99) * 1000,
        cpu_s_per_1000_deltas=cpu / verdict.deltas * 1000 if verdict.deltas else 0.0,
        cpu_s=round(cpu, 3),
        peak_rss_mib=process.sampler.peak_rss / 2**20,
        simulator_cpu_s=round(sim_cpu, 3),
        broker_cpu_s=None if broker_cpu is None else round(broker_cpu, 3),
        bench_cpu_s=round(bench_cpu, 3),
        machine_busy_cores=machine_cpu / window,
        other_processes_cores=max(0.0, others) / window,
        retried_requests=verdict.retried_requests,
        mean_delta_bytes=verdict.mean_delta_bytes,
        log=str(process.log_path),
    )


#: The ceiling is the best of this many runs: a denominator measured low would flatter the worker.
CEILING_RUNS = 3


async def run_ceiling(
    ctx: Context, scenario: Scenario, load: Sequence[RequestSpec], record_bytes: int
) -> CeilingResult:
    """The bare producer: one delta-sized record per delta of the load, keyed as the worker's.

    Best of ``CEILING_RUNS``, each on a fresh topic, without collector pauses: a full collection
    over the 100,000 records the reader kept from the run before once halved a ceiling run.
    """
    keys = _delta_keys(load, scenario.reply_tokens)
    value = _delta_value(record_bytes)
    with _no_collector_pauses():
        runs = [
            await _ceiling_once(ctx, scenario, keys, value, index) for index in range(CEILING_RUNS)
        ]
    best = max(runs, key=lambda run: run.deltas_per_s)
    rates = ", ".join(f"{run.deltas_per_s:,.0f}" for run in runs)
    say(f"{scenario.name}/ceiling: {len(keys)} records of {len(value)} bytes; records/s {rates}")
    return best


async def _ceiling_once(
    ctx: Context, scenario: Scenario, keys: list[bytes], value: bytes, index: int
) -> CeilingResult:
    topic = f"bench-{ctx.run_id}-{scenario.name}-ceiling-{index}"
    await create_topics(ctx.bootstrap, [topic], scenario.partitions)
    broker = None
    if ctx.broker_pid is not None:
        with contextlib.suppress(psutil.Error):
            broker = Sampler.of_process(ctx.broker_pid).start()
    bench = Sampler.of_process(os.getpid()).start()
    started = time.time()
    try:
        seconds, rate = await raw_ceiling(ctx.bootstrap, topic, keys, value)
        await asyncio.sleep(0.2)  # a sample after the end
    finally:
        bench.stop()
        if broker is not None:
            broker.stop()
    ended = started + seconds
    return CeilingResult(
        len(keys),
        len(value),
        round(seconds, 3),
        rate,
        producer_cpu_s=round(bench.cpu_between(started, ended), 3),
        broker_cpu_s=None if broker is None else round(broker.cpu_between(started, ended), 3),
    )


def _delta_keys(load: Sequence[RequestSpec], tokens: int) -> list[bytes]:
    """The deltas' keys in the order the worker meets them: turn by turn, streams interleaved."""
    keys: list[bytes] = []
    for turn in sorted({spec.turn for spec in load}):
        group = [spec.conversation_id.encode() for spec in load if spec.turn == turn]
        for _ in range(tokens):
            keys.extend(group)
    return keys


def _delta_value(size: int) -> bytes:
    """A ``chat.delta.v1``-shaped JSON record of ``size`` bytes (at least the empty shape)."""
    body = {
        "request_id": "c00000-t1",
        "conversation_id": "c00000",
        "chat_id": "chat_0123456789abcdef0123456789abcdef",
        "attempt": 1,
        "seq": 42,
        "delta": "",
        "ts": time.time(),
    }
    empty = len(json.dumps(body, separators=(",", ":")))
    body["delta"] = "x" * max(0, size - empty)
    return json.dumps(body, separators=(",", ":")).encode()
