"""``make demo``: a two-turn conversation through a real broker, the simulator and one worker.

Starts what is missing (the local Kafka broker unless KAFKA_BOOTSTRAP_SERVERS is set, the
simulator unless VAPI_API_KEY is set, one worker), follows the output topics with ``tail`` while
it sends "My name is Alice" and then "What's my name?", checks that the second answer remembers
the name, and stops everything it started. Exit code 0 only when the name was remembered.
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

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker.config import Settings  # noqa: E402
from worker.console import send_request, tail  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m", flush=True)


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"demo: a process exited early ({proc.args})")
        time.sleep(0.2)
    raise SystemExit(f"demo: {url} did not answer within {timeout_s} s")


def main() -> int:
    started: list[subprocess.Popen[bytes]] = []
    env = dict(os.environ)
    own_broker = "KAFKA_BOOTSTRAP_SERVERS" not in env
    if own_broker:
        say("starting a local Apache Kafka broker (jars from Maven Central)")
        subprocess.run(["bash", str(ROOT / "scripts/local-kafka.sh"), "up"], check=True)
        env["KAFKA_BOOTSTRAP_SERVERS"] = f"127.0.0.1:{env.get('LOCAL_KAFKA_PORT', '9092')}"
    try:
        if "VAPI_API_KEY" not in env:
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
                    "demo-key",
                    "--inter-token-delay-s",
                    "0.06",
                ],
                stdout=subprocess.DEVNULL,
            )
            started.append(sim)
            wait_http(f"http://127.0.0.1:{port}/healthz", 20, sim)
            env.update(
                VAPI_BASE_URL=f"http://127.0.0.1:{port}",
                VAPI_API_KEY="demo-key",
                VAPI_ASSISTANT_ID="sim-assistant",
            )
        http_port = free_port()
        env.update(
            WORKER_APP_ID=env.get("WORKER_APP_ID", f"demo-{uuid.uuid4().hex[:6]}"),
            WORKER_HTTP_PORT=str(http_port),
            LOG_FORMAT="json",
        )
        log_path = ROOT / ".run" / "demo-worker.log"
        log_path.parent.mkdir(exist_ok=True)
        say(f"starting one worker (vapi-worker run); its log: {log_path.relative_to(ROOT)}")
        worker_log = log_path.open("wb")
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker", "run"],
            env=env,
            stdout=worker_log,
            stderr=subprocess.STDOUT,
        )
        started.append(worker)
        wait_http(f"http://127.0.0.1:{http_port}/readyz", 90, worker)
        os.environ.update(env)
        settings = Settings()
        remembered = asyncio.run(run_conversation(settings))
        say("the assistant remembered the name" if remembered else "the name was NOT remembered")
        return 0 if remembered else 1
    finally:
        for proc in reversed(started):
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
            if proc.poll() is None:
                proc.kill()
        if own_broker:
            say("stopping the local broker")
            subprocess.run(["bash", str(ROOT / "scripts/local-kafka.sh"), "down"], check=False)


async def run_conversation(settings: Settings) -> bool:
    """Send both turns, render the stream live, return whether turn two says 'Alice'."""
    import io

    class Tee(io.TextIOBase):
        def __init__(self) -> None:
            self.text = ""

        def write(self, s: str) -> int:
            self.text += s
            sys.stdout.write(s)
            return len(s)

        def flush(self) -> None:
            sys.stdout.flush()

    conversation = f"demo-{uuid.uuid4().hex[:8]}"
    out = Tee()
    ready = asyncio.Event()
    follower = asyncio.create_task(
        tail(settings, conversation=conversation, until_responses=2, out=out, on_ready=ready.set)
    )
    await ready.wait()
    for number, text in enumerate(["My name is Alice.", "What's my name?"], start=1):
        say(f"turn {number}: the user says {text!r}")
        await send_request(settings, conversation, text)
        deadline = time.monotonic() + 60
        while out.text.count("└─") < number:
            if follower.done() or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
    await asyncio.wait_for(follower, 60)
    second_turn = out.text.split("└─")[1] if out.text.count("└─") >= 2 else ""
    return "Alice" in second_turn


if __name__ == "__main__":
    raise SystemExit(main())
