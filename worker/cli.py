"""``vapi-worker``: argv → settings → logging → run / gateway / simulator / send / cancel / tail.
No logic here."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

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
    commands.add_parser(
        "gateway",
        help="serve conversations to browsers (HTTP + SSE) and the chat page, until SIGTERM",
    )
    simulator = commands.add_parser("simulator", help="serve the Vapi /chat simulator")
    simulator_cli.add_arguments(simulator)

    send = commands.add_parser("send", help="produce one chat request; prints its request_id")
    send.add_argument("--conversation", required=True, help="conversation id (the record key)")
    send.add_argument("--request-id", help="idempotency key (default: a new UUID)")
    send.add_argument("--assistant", help="assistant id (default: VAPI_ASSISTANT_ID)")
    send.add_argument("--reset-context", action="store_true", help="start a fresh Vapi chat")
    send.add_argument(
        "--supersede",
        action="store_true",
        help="cancel the conversation's earlier requests still queued or streaming first",
    )
    send.add_argument("text", help="what the user says")

    cancel = commands.add_parser(
        "cancel",
        help="produce one chat.cancel.v1: a request, or every earlier request of a conversation",
        description="Cancel a request of the conversation (--request-id), or every request of it "
        "the worker took before this cancel. A queued request ends without a Vapi call, a "
        "streaming one has its call closed; each ends with a final response of status "
        "cancelled. A request already finished is not affected.",
    )
    cancel.add_argument("--conversation", required=True, help="conversation id (the record key)")
    cancel.add_argument("--request-id", help="only this request (default: all taken before)")

    tail = commands.add_parser(
        "tail",
        help="follow deltas and responses, rendered live",
        description="Follow deltas and responses from the topics' end, or from --since or "
        "--from-beginning. With --request-id: that request's reply, found whether tail starts "
        "before or after it (read from the beginning unless --since is given); exits after its "
        "final response, 0 if it completed and 1 otherwise (failed, expired, cancelled).",
    )
    tail.add_argument("--conversation", help="only this conversation")
    start = tail.add_mutually_exclusive_group()
    start.add_argument("--from-beginning", action="store_true", help="replay the topics first")
    start.add_argument(
        "--since",
        type=_since,
        metavar="WHEN",
        help="start at this time: a duration ago (90s, 10m, 2h, 1d) or an ISO 8601 time (UTC "
        "unless it names an offset)",
    )
    stop = tail.add_mutually_exclusive_group()
    stop.add_argument("--until", type=int, help="exit after this many final responses")
    stop.add_argument("--request-id", help="only this request; exit after its final response")
    tail.add_argument(
        "--json",
        action="store_true",
        help="print the records (duplicates dropped) and restarts as JSON lines",
    )
    return parser


def _since(text: str) -> int:
    from worker.console import parse_since

    try:
        return parse_since(text, datetime.now(UTC))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
    if args.command == "gateway":
        from worker.gateway.server import run_gateway

        return run_gateway(settings)
    if args.command == "send":
        request_id = asyncio.run(
            console.send_request(
                settings,
                args.conversation,
                args.text,
                request_id=args.request_id,
                assistant_id=args.assistant,
                reset_context=args.reset_context,
                supersede=args.supersede,
            )
        )
        print(request_id)
        return 0
    if args.command == "cancel":
        asyncio.run(console.send_cancel(settings, args.conversation, args.request_id))
        return 0
    finals = asyncio.run(
        console.tail(
            settings,
            conversation=args.conversation,
            request_id=args.request_id,
            from_beginning=args.from_beginning,
            since_ms=args.since,
            until_responses=args.until,
            raw_json=args.json,
        )
    )
    if args.request_id is not None and finals[-1].get("status") != "completed":
        return 1
    return 0
