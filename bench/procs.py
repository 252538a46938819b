"""The processes a bench run starts, and the sampler that watches one of them.

Everything listens on 127.0.0.1 on free ports. Each class stops what it started (``stop``), and
the callers do that in ``finally`` blocks, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil  # type: ignore[import-untyped]  # no stubs in the dev extras

ROOT = Path(__file__).resolve().parents[1]
RUN_DIR = ROOT / ".run"
SIM_KEY = "bench-sim-key-0123456789"


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalBroker:
    """``scripts/local-kafka.sh`` on two free ports (client and KRaft controller)."""

    def __init__(self) -> None:
        self.env = {
            **os.environ,
            "LOCAL_KAFKA_PORT": str(free_port()),
            "LOCAL_KAFKA_CONTROLLER_PORT": str(free_port()),
        }
        self.bootstrap: str | None = None

    def start(self) -> str:
        """Start the broker; returns its bootstrap address (about 5-20 s)."""
        done = subprocess.run(
            ["bash", "scripts/local-kafka.sh", "up"],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            check=False,
            timeout=300,
        )
        self.bootstrap = done.stdout.decode().strip().splitlines()[-1] if done.stdout else None
        if done.returncode != 0 or not self.bootstrap:
            self.stop()
            raise RuntimeError(f"local Kafka broker did not start (exit {done.returncode})")
        return self.bootstrap

    @property
    def pid(self) -> int | None:
        """The broker's JVM pid, from the script's pid file."""
        pid_file = RUN_DIR / f"kafka-{self.env['LOCAL_KAFKA_PORT']}" / "kafka.pid"
        try:
            return int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        """Stop the broker and remove its log dir (safe to call when it never started)."""
        subprocess.run(
            ["bash", "scripts/local-kafka.sh", "down"],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.DEVNULL,
            check=False,
            timeout=120,
        )


@dataclass(frozen=True)
class Pacing:
    """How the simulator streams: tokens per reply and the delays, in milliseconds."""

    reply_tokens: int
    first_token_latency_ms: float
    inter_token_delay_ms: float


class Simulator:
    """``python -m worker simulator --record-delta-times`` in its own process."""

    def __init__(self, pacing: Pacing, log_path: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._pacing = pacing
        self._log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.sampler: Sampler | None = None

    def start(self) -> Simulator:
        """Start it and wait for ``/healthz``."""
        pacing = self._pacing
        argv = [
            sys.executable,
            "-m",
            "worker",
            "simulator",
            "--port",
            str(self.port),
            "--api-key",
            SIM_KEY,
            "--first-token-latency-s",
            str(pacing.first_token_latency_ms / 1000),
            "--inter-token-delay-s",
            str(pacing.inter_token_delay_ms / 1000),
            "--reply-tokens",
            str(pacing.reply_tokens),
            "--record-delta-times",
        ]
        with self._log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200:
                    self.sampler = Sampler.of_process(self.proc.pid).start()
                    return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"simulator exited with {self.proc.returncode}")
            time.sleep(0.1)
        raise RuntimeError("simulator did not answer /healthz within 30 s")

    def get(self, path: str) -> Any:
        """GET one of the ``/_sim/...`` inspection endpoints as JSON."""
        return httpx.get(f"{self.base_url}{path}", timeout=60).json()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.sampler is not None:
            self.sampler.stop()
        stop_process(self.proc, 10)


def stop_process(proc: subprocess.Popen[bytes] | None, timeout_s: float) -> int | None:
    """SIGTERM ``proc``, wait ``timeout_s``, then SIGKILL; returns its exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@dataclass(frozen=True, slots=True)
class Sample:
    """One look: wall time, CPU seconds used so far (user + system), RSS bytes."""

    at: float
    cpu_s: float
    rss: int


Probe = Callable[[], tuple[float, int]]


def process_probe(pid: int) -> Probe:
    """CPU seconds and RSS of one process."""
    process = psutil.Process(pid)

    def probe() -> tuple[float, int]:
        with process.oneshot():
            cpu = process.cpu_times()
            return cpu.user + cpu.system, int(process.memory_info().rss)

    return probe


def machine_probe() -> tuple[float, int]:
    """CPU seconds the whole machine was busy (all cores, anything but idle and iowait)."""
    times = psutil.cpu_times()
    busy = sum(times) - times.idle - getattr(times, "iowait", 0.0)
    return busy, 0


class Sampler:
    """Samples a probe (a process's or the machine's CPU time) every ``interval_s`` on a thread."""

    def __init__(self, probe: Probe, name: str, interval_s: float = 0.1) -> None:
        self._probe = probe
        self._interval_s = interval_s
        self.samples: list[Sample] = []
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sampler-{name}", daemon=True)

    @classmethod
    def of_process(cls, pid: int) -> Sampler:
        return cls(process_probe(pid), str(pid))

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                cpu_s, rss = self._probe()
            except psutil.Error:
                return
            self.samples.append(Sample(time.time(), cpu_s, rss))
            self._stopped.wait(self._interval_s)

    def cpu_between(self, start: float, end: float) -> float:
        """CPU seconds used between two wall-clock times, interpolated between samples."""
        return self._cpu_at(end) - self._cpu_at(start)

    def _cpu_at(self, when: float) -> float:
        samples = self.samples
        if not samples:
            return 0.0
        if when <= samples[0].at:
            return samples[0].cpu_s
        for before, after in itertools.pairwise(samples):
            if before.at <= when <= after.at:
                span = after.at - before.at
                share = (when - before.at) / span if span > 0 else 1.0
                return before.cpu_s + share * (after.cpu_s - before.cpu_s)
        return samples[-1].cpu_s

    @property
    def peak_rss(self) -> int:
        return max((s.rss for s in self.samples), default=0)


class ServiceProcess:
    """A Python process under test (the worker or the baseline), its log in a file, sampled."""

    def __init__(
        self, argv: Sequence[str], env: Mapping[str, str], log_path: Path, name: str
    ) -> None:
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = log_path
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.sampler: Sampler | None = None

    def start(self) -> ServiceProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        self.sampler = Sampler.of_process(self.proc.pid).start()
        return self

    def exited(self) -> int | None:
        """The exit code if the process has ended, else None."""
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, timeout_s: float = 60) -> int | None:
        """SIGTERM (a graceful drain), SIGKILL after ``timeout_s``; stops the sampler first."""
        if self.sampler is not None:
            self.sampler.stop()
        return stop_process(self.proc, timeout_s)
