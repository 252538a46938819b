"""``python -m bench``: arguments → broker → scenarios → table and JSON. Exit 1 only when a run
could not finish or its outputs were wrong; a missed target is reported, not an error."""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from bench.procs import RUN_DIR, LocalBroker
from bench.report import render, write_json
from bench.run import BenchFailure, Context, ScenarioResult, run_scenario, say, warm_up
from bench.scenarios import QUICK, SCENARIOS, Scenario

#: Other processes' load (cores) above which the table's wall-clock numbers get a warning.
BUSY_WARNING_CORES = 0.25


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the worker against a plain Faust agent and a bare producer. "
        "Scenario options override the chosen scenarios' defaults.",
    )
    parser.add_argument(
        "--scenario", choices=["all", *SCENARIOS], default="all", help="which scenario(s) to run"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a small smoke run (targets not judged)"
    )
    parser.add_argument("--requests", type=int, help="requests in the load")
    parser.add_argument("--conversations", type=int, help="conversations they are spread over")
    parser.add_argument("--reply-tokens", type=int, help="deltas per reply")
    parser.add_argument("--inter-token-delay-ms", type=float, help="simulator gap between deltas")
    parser.add_argument("--first-token-latency-ms", type=float, help="simulator first-delta delay")
    parser.add_argument("--partitions", type=int, help="partitions of every topic")
    parser.add_argument(
        "--baseline-fraction",
        type=float,
        help="share of the conversations the baseline gets (0: skip)",
    )
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the worker, e.g. WORKER_MAX_IN_FLIGHT=128 (repeatable)",
    )
    parser.add_argument(
        "--profile-worker", action="store_true", help="run the worker under cProfile (.run/*.prof)"
    )
    parser.add_argument(
        "--no-warm-up",
        action="store_true",
        help="measure on a cold broker (by default a broker the bench starts is warmed up first)",
    )
    parser.add_argument("--timeout-s", type=float, help="per-run limit (default: from the load)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    overrides = {
        "requests": args.requests,
        "conversations": args.conversations,
        "reply_tokens": args.reply_tokens,
        "inter_token_delay_ms": args.inter_token_delay_ms,
        "first_token_latency_ms": args.first_token_latency_ms,
        "partitions": args.partitions,
        "baseline_fraction": args.baseline_fraction,
    }
    base = QUICK if args.quick else SCENARIOS
    scenarios = [base[name].with_overrides(overrides) for name in names]
    worker_env = dict(item.split("=", 1) for item in args.worker_env)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    RUN_DIR.mkdir(exist_ok=True)
    run_dir = RUN_DIR / f"bench-{stamp}"
    run_dir.mkdir()
    try:
        results = asyncio.run(_run_all(scenarios, stamp, run_dir, args, worker_env))
    except BenchFailure as exc:
        say(f"FAILED: {exc}")
        return 1
    table, checks = render(results, judged=not args.quick)
    print(table)
    path = RUN_DIR / f"bench-{stamp}.json"
    write_json(
        path,
        results,
        table,
        checks,
        {
            "timestamp": stamp,
            "quick": args.quick,
            "profiled": args.profile_worker,
            "worker_env": worker_env,
            "logs": str(run_dir),
        },
    )
    missed = [c for c in checks if not c.passed]
    print(f"targets: {len(checks) - len(missed)} met, {len(missed)} missed; JSON: {path}")
    others = max(
        (r.other_processes_cores for res in results for r in (res.worker, res.baseline) if r),
        default=0.0,
    )
    if others > BUSY_WARNING_CORES:
        print(
            f"warning: processes this bench did not start kept up to {others:.2f} of the "
            f"{os.cpu_count()} cores busy during a run; wall-clock numbers (rates, latencies) "
            "are lower than on a quiet machine and vary from run to run"
        )
    return 0


async def _run_all(
    scenarios: Sequence[Scenario],
    stamp: str,
    run_dir: Path,
    args: argparse.Namespace,
    worker_env: dict[str, str],
) -> list[ScenarioResult]:
    broker: LocalBroker | None = None
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    try:
        if not bootstrap:
            broker = LocalBroker()
            started = time.monotonic()
            bootstrap = await asyncio.to_thread(broker.start)
            say(f"local Kafka broker at {bootstrap} ({time.monotonic() - started:.1f} s)")
        ctx = Context(
            bootstrap=bootstrap,
            run_id=stamp.lower(),
            run_dir=run_dir,
            profile_worker=args.profile_worker,
            worker_env=worker_env,
            timeout_s=args.timeout_s,
            broker_pid=None if broker is None else broker.pid,
        )
        if broker is not None and not args.no_warm_up:
            await warm_up(ctx)
        results = []
        for scenario in scenarios:
            results.append(await run_scenario(ctx, scenario))
        return results
    finally:
        if broker is not None:
            await asyncio.to_thread(broker.stop)
