"""The gateway in its own process, and a small SSE reader for tests that speak HTTP to it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from tests.e2e.harness import ROOT, SimulatorProcess, Topics, WorkerProcess, free_port, stop_process
from tests.kafka_fixture import create_topics
from worker.gateway.tokens import issue_token

SECRET = "gateway-test-secret-0123456789"


class GatewayProcess:
    """``vapi-worker gateway`` on a free port (or the one given, to restart it in place)."""

    def __init__(
        self, bootstrap: str, topics: Topics, log_dir: Path, port: int | None = None, **env: str
    ) -> None:
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"gateway-{self.port}.log"
        self.env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(self.port),
            "GATEWAY_SECRET": SECRET,
            "LOG_FORMAT": "json",
            **topics.env(),
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def token(self, conversation_id: str) -> str:
        return issue_token(SECRET, conversation_id)

    def start(self) -> GatewayProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "gateway"],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200:
                    return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.1)
        raise RuntimeError(f"gateway did not answer /healthz within 30 s:\n{self.log()}")

    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(f"{self.base_url}/healthz", timeout=5).json()
        return body

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        """SIGKILL: the browsers' connections break without a goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        stop_process(self.proc, 15)


@contextlib.asynccontextmanager
async def worker_and_gateway(
    bootstrap: str,
    topics: Topics,
    simulator: SimulatorProcess,
    log_dir: Path,
    partitions: int,
    **gateway_env: str,
) -> AsyncIterator[tuple[WorkerProcess, GatewayProcess]]:
    """A ready worker and a gateway on the test's topics (created with ``partitions``)."""
    await create_topics(bootstrap, [topics.requests, topics.deltas, topics.responses], partitions)
    worker = WorkerProcess(bootstrap, topics, simulator, log_dir).start()
    gateway = GatewayProcess(bootstrap, topics, log_dir, **gateway_env).start()
    try:
        worker.wait_ready()
        yield worker, gateway
    finally:
        gateway.stop()
        worker.terminate()


@dataclass(frozen=True)
class SseMessage:
    event: str
    id: str | None
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


async def sse_messages(response: aiohttp.ClientResponse) -> AsyncIterator[SseMessage]:
    """The events of a ``text/event-stream`` response, as a browser's EventSource parses them
    (comments skipped; an event without data sets only the id)."""
    event, data, last_id = "message", [], None
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                yield SseMessage(event, last_id, "\n".join(data))
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            last_id = value
