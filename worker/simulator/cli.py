"""``vapi-worker simulator`` / ``python -m worker.simulator``: serve the simulator until a signal.

Why a separate entry point: end-to-end tests and the demo run the simulator as its own process,
a real network peer like Vapi, so the worker's timeouts and connection handling are exercised
for real. ``--fault`` takes the rule syntax documented in ``worker.simulator.faults``, e.g.
``--fault 'assistant=sim-429:status code=429 retry_after=1 times=2'``; it may be repeated.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from worker.simulator.errors import SpecError
from worker.simulator.faults import FaultRule, parse_fault_rule
from worker.simulator.server import SimulatorConfig, serve_simulator

DEFAULT_PORT = 8089


def _fault_rule(text: str) -> FaultRule:
    try:
        return parse_fault_rule(text)
    except SpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's options to ``parser`` (a subcommand's or a standalone one)."""
    defaults = SimulatorConfig()
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    parser.add_argument("--api-key", default=defaults.api_key, help="the accepted Bearer key")
    parser.add_argument(
        "--first-token-latency-s", type=float, default=defaults.first_token_latency_s
    )
    parser.add_argument("--inter-token-delay-s", type=float, default=defaults.inter_token_delay_s)
    parser.add_argument(
        "--reply-tokens", type=int, default=defaults.reply_tokens, help="generic reply length"
    )
    parser.add_argument("--done-marker", action="store_true", help="end streams with [DONE]")
    parser.add_argument("--record-delta-times", action="store_true", help="serve /_sim/delta-times")
    parser.add_argument(
        "--max-chats",
        type=int,
        default=defaults.max_chats,
        help="the organisation's limit on chats at once; over it, 429 (0: none)",
    )
    parser.add_argument(
        "--max-chats-retry-after-s",
        type=float,
        default=defaults.max_chats_retry_after_s,
        help="the Retry-After of a 429 over --max-chats",
    )
    parser.add_argument(
        "--fault",
        action="append",
        type=_fault_rule,
        default=[],
        metavar="RULE",
        help="server-wide fault, '[assistant=ID][,input=TEXT]:KIND k=v ... [times=K]'",
    )


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    """The ``SimulatorConfig`` the parsed options describe."""
    return SimulatorConfig(
        api_key=args.api_key,
        first_token_latency_s=args.first_token_latency_s,
        inter_token_delay_s=args.inter_token_delay_s,
        reply_tokens=args.reply_tokens,
        done_marker=args.done_marker,
        record_delta_times=args.record_delta_times,
        faults=list(args.fault),
        max_chats=args.max_chats,
        max_chats_retry_after_s=args.max_chats_retry_after_s,
    )


async def _serve(config: SimulatorConfig, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with serve_simulator(config, host, port) as simulator:
        print(f"simulator listening on {simulator.base_url}", flush=True)
        await stop.wait()


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; returns the exit code (0)."""
    asyncio.run(_serve(config_from_args(args), args.host, args.port))
    return 0
