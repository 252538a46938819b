"""``vapi-worker``: argv → settings → logging → run / simulator / send / tail. No logic here."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from worker.config import Settings
from worker.errors import ConfigError
from worker.logs import configure_logging, register_secret


def _parser() -> argparse.ArgumentParser:
    from worker.simulator import cli as simulator_cli

    parser = argparse.ArgumentParser(
        prog="vapi-worker",
        description="Stream Vapi chat replies between Kafka topics. Settings come from the "
        "environment (see the README's configuration table).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="run the worker (a Faust app) until SIGTERM")
    simulator = commands.add_parser("simulator", help="serve the Vapi /chat simulator")
    simulator_cli.add_arguments(simulator)

    send = commands.add_parser("send", help="produce one chat request; prints its request_id")
    send.add_argument("--conversation", required=True, help="conversation id (the record key)")
    send.add_argument("--request-id", help="idempotency key (default: a new UUID)")
    send.add_argument("--assistant", help="assistant id (default: VAPI_ASSISTANT_ID)")
    send.add_argument("--reset-context", action="store_true", help="start a fresh Vapi chat")
    send.add_argument("text", help="what the user says")

    tail = commands.add_parser("tail", help="follow deltas and responses, rendered live")
    tail.add_argument("--conversation", help="only this conversation")
    tail.add_argument("--from-beginning", action="store_true", help="replay the topics first")
    tail.add_argument("--until", type=int, help="exit after this many final responses")
    tail.add_argument("--json", action="store_true", help="print the raw records as JSON lines")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "simulator":
        from worker.simulator import cli as simulator_cli

        return simulator_cli.run(args)
    try:
        settings = Settings()
    except (ValidationError, ConfigError) as exc:
        print(f"vapi-worker: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    for secret in settings.secrets():
        register_secret(secret.get_secret_value())
    configure_logging(settings.log_level, settings.log_format)
    try:
        return _dispatch(args, settings)
    except ConfigError as exc:
        print(f"vapi-worker: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    from worker import console

    if args.command == "run":
        from worker.runner import run_worker

        return run_worker(settings)
    if args.command == "send":
        request_id = asyncio.run(
            console.send_request(
                settings,
                args.conversation,
                args.text,
                request_id=args.request_id,
                assistant_id=args.assistant,
                reset_context=args.reset_context,
            )
        )
        print(request_id)
        return 0
    asyncio.run(
        console.tail(
            settings,
            conversation=args.conversation,
            from_beginning=args.from_beginning,
            until_responses=args.until,
            raw_json=args.json,
        )
    )
    return 0
