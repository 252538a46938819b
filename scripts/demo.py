"""``make demo``: a two-turn conversation through a real broker, the simulator and one worker.

Starts what is missing (the local Kafka broker unless KAFKA_BOOTSTRAP_SERVERS is set, the
simulator unless VAPI_API_KEY is set, one worker), then asks "My name is Alice" and "What's my
name?" with the client (``ChatClient.ask``), rendering each reply live as it streams, checks that
the second answer completed and names Alice, and stops everything it started, also when it is
interrupted or terminated. Exit code 0 only when the name was remembered.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import FrameType

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vapi_stream_client import AskTimeoutError, ChatResponse, FollowEvent  # noqa: E402
from worker.config import Settings  # noqa: E402
from worker.console import TailRenderer, chat_client  # noqa: E402

NAME = "Alice"
TURNS = (f"My name is {NAME}.", "What's my name?")
#: The assistant the worker names when it talks to the demo's own simulator (which takes any).
SIMULATOR_ASSISTANT_ID = "sim-assistant"
SIMULATOR_KEY = "demo-key"
TURN_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m", flush=True)


class DemoError(Exception):
    """The demo cannot go on; the message says why."""


def wait_http(
    url: str, timeout_s: float, proc: subprocess.Popen[bytes], what: str, log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        if proc.poll() is not None:
            raise DemoError(f"the {what} exited with {proc.returncode}{_log_tail(log)}")
        time.sleep(0.2)
    raise DemoError(f"the {what} did not answer {url} within {timeout_s:.0f} s{_log_tail(log)}")


def _log_tail(log: Path | None, lines: int = 20) -> str:
    if log is None or not log.exists():
        return ""
    tail = log.read_text(errors="replace").splitlines()[-lines:]
    return f"; the end of {log.relative_to(ROOT)}:\n" + "\n".join(tail)


def _terminate(signum: int, _frame: FrameType | None) -> None:
    # SIGTERM unwinds like Ctrl-C, so ``main``'s ``finally`` stops what was started.
    raise SystemExit(128 + signum)


def _ignore(_signum: int, _frame: FrameType | None) -> None:
    # A Python handler, not SIG_IGN: that one would be inherited by the processes started later.
    return None


def main() -> int:
    signal.signal(signal.SIGTERM, _terminate)
    started: list[subprocess.Popen[bytes]] = []
    env = dict(os.environ)
    own_broker = "KAFKA_BOOTSTRAP_SERVERS" not in env
    try:
        if own_broker:
            env["KAFKA_BOOTSTRAP_SERVERS"] = start_broker()
        if "VAPI_API_KEY" not in env:
            env.update(start_simulator(started))
            env["VAPI_ASSISTANT_ID"] = env.get("VAPI_ASSISTANT_ID") or SIMULATOR_ASSISTANT_ID
        start_worker(env, started)
        os.environ.update(env)
        answers = asyncio.run(run_conversation(Settings()))
        remembered = (
            len(answers) == len(TURNS)
            and answers[-1].status == "completed"
            and NAME in answers[-1].text
        )
        say("the assistant remembered the name" if remembered else "the name was NOT remembered")
        return 0 if remembered else 1
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        # A second SIGTERM must not cut the clean-up short.
        signal.signal(signal.SIGTERM, _ignore)
        stop(started)
        if own_broker:
            say("stopping the local broker")
            subprocess.run(["bash", str(ROOT / "scripts/local-kafka.sh"), "down"], check=False)


def start_broker() -> str:
    """Start the local broker (scripts/local-kafka.sh up); return its bootstrap address."""
    say("starting a local Apache Kafka broker (jars from Maven Central)")
    up = subprocess.run(
        ["bash", str(ROOT / "scripts/local-kafka.sh"), "up"],
        check=False,
        stdout=subprocess.PIPE,
        text=True,
    )
    if up.returncode != 0:
        raise DemoError("the local Kafka broker did not start (see above)")
    return up.stdout.strip().splitlines()[-1]


def start_simulator(started: list[subprocess.Popen[bytes]]) -> dict[str, str]:
    """Start the Vapi simulator; return the worker settings that point at it."""
    port = free_port()
    say(f"starting the Vapi simulator on 127.0.0.1:{port}")
    sim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker",
            "simulator",
            "--port",
            str(port),
            "--api-key",
            SIMULATOR_KEY,
            "--inter-token-delay-s",
            "0.06",
        ],
        stdout=subprocess.DEVNULL,
    )
    started.append(sim)
    wait_http(f"http://127.0.0.1:{port}/healthz", 20, sim, "simulator")
    return {"VAPI_BASE_URL": f"http://127.0.0.1:{port}", "VAPI_API_KEY": SIMULATOR_KEY}


def start_worker(env: dict[str, str], started: list[subprocess.Popen[bytes]]) -> None:
    """Start one worker with ``env`` (its settings completed here) and wait until it is ready."""
    http_port = free_port()
    env.update(
        WORKER_APP_ID=env.get("WORKER_APP_ID", f"demo-{uuid.uuid4().hex[:6]}"),
        WORKER_HTTP_PORT=str(http_port),
        LOG_FORMAT="json",
    )
    log = ROOT / ".run" / "demo-worker.log"
    log.parent.mkdir(exist_ok=True)
    say(f"starting one worker (vapi-worker run); its log: {log.relative_to(ROOT)}")
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker", "run"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    started.append(worker)
    wait_http(f"http://127.0.0.1:{http_port}/readyz", 90, worker, "worker", log)


def stop(started: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each process (last started first), SIGKILL what has not exited in time."""
    for proc in reversed(started):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in reversed(started):
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_TIMEOUT_S)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def run_conversation(settings: Settings) -> list[ChatResponse]:
    """Ask the turns one after the other, rendering the stream live; return the final responses.

    Stops early when a turn fails or gets no final response within ``TURN_TIMEOUT_S``.
    """
    conversation = f"demo-{uuid.uuid4().hex[:8]}"
    renderer = TailRenderer()

    def show(event: FollowEvent) -> None:
        sys.stdout.write(renderer.render(event))
        sys.stdout.flush()

    answers: list[ChatResponse] = []
    async with chat_client(settings) as client:
        for number, text in enumerate(TURNS, start=1):
            say(f"turn {number}: the user says {text!r}")
            try:
                answer = await client.ask(
                    conversation, text, on_event=show, timeout_s=TURN_TIMEOUT_S
                )
            except AskTimeoutError:
                say(f"no final response to turn {number} within {TURN_TIMEOUT_S:.0f} s")
                break
            answers.append(answer)
            if answer.status != "completed":
                break
    return answers


if __name__ == "__main__":
    raise SystemExit(main())
