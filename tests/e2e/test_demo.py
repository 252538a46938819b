"""``scripts/demo.py`` (what ``make demo`` runs), end to end against the session's broker.

The demo gets the broker through ``KAFKA_BOOTSTRAP_SERVERS`` and its own topics and app id;
everything else is as on a fresh clone. Every process it starts inherits its ``WORKER_APP_ID``,
which is how a test finds what the demo left running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import ROOT, SimulatorProcess, Topics

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

DEMO = ROOT / "scripts" / "demo.py"
DEMO_TIMEOUT_S = 180


def _demo_env(bootstrap: str, topics: Topics, **extra: str) -> dict[str, str]:
    """A fresh clone's environment (no Vapi settings) plus the broker and this test's topics."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("VAPI_")}
    return {**env, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, **topics.env(), **extra}


def _processes_of(app_id: str) -> list[int]:
    """Pids of live processes whose environment has ``WORKER_APP_ID=app_id``."""
    marker = f"WORKER_APP_ID={app_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
    return found


@pytest.fixture(autouse=True)
def _kill_leftovers(topics: Topics) -> Iterator[None]:
    """After the test, kill whatever the demo left behind (the test has failed by then)."""
    yield
    for pid in _processes_of(topics.app_id):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _wait_gone(app_id: str, timeout_s: float = 10) -> list[int]:
    """The demo's processes still alive after ``timeout_s`` (children may take a moment)."""
    deadline = time.monotonic() + timeout_s
    while (alive := _processes_of(app_id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def _run_demo(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DEMO)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
        check=False,
    )


def test_the_demo_remembers_the_name_on_a_fresh_clone_and_stops_everything(
    kafka_bootstrap: str, topics: Topics
) -> None:
    """No Vapi settings at all: the demo's own simulator and worker answer, then both stop."""
    result = _run_demo(_demo_env(kafka_bootstrap, topics))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Your name is Alice." in result.stdout
    assert "the assistant remembered the name" in result.stdout
    assert _wait_gone(topics.app_id) == []


def test_the_demo_fails_when_the_assistant_forgets_the_name(
    kafka_bootstrap: str, topics: Topics
) -> None:
    """A Vapi that lost the first chat (404 on its id): the second turn answers without it."""
    simulator = SimulatorProcess(
        "--first-token-latency-s", "0.05", "--fault", "input=name?:status code=404 times=1"
    ).start()
    try:
        env = _demo_env(
            kafka_bootstrap,
            topics,
            VAPI_BASE_URL=simulator.base_url,
            VAPI_API_KEY=simulator.api_key,
            VAPI_ASSISTANT_ID="sim-assistant",
        )
        result = _run_demo(env)
    finally:
        simulator.stop()
    output = result.stdout + result.stderr
    assert "I don't know your name yet." in result.stdout, output
    assert result.returncode == 1, output
    assert "the name was NOT remembered" in result.stdout
    assert _wait_gone(topics.app_id) == []


def test_a_terminated_demo_stops_what_it_started(
    kafka_bootstrap: str, topics: Topics, tmp_path: Path
) -> None:
    """SIGTERM (a CI timeout, ``kill``) mid-conversation: the simulator and worker stop too."""
    output = tmp_path / "demo.out"
    with output.open("wb") as out:
        demo = subprocess.Popen(
            [sys.executable, str(DEMO)],
            cwd=ROOT,
            env=_demo_env(kafka_bootstrap, topics),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while "turn 1:" not in output.read_text() and demo.poll() is None:
            assert time.monotonic() < deadline, output.read_text()
            time.sleep(0.05)
        running = _processes_of(topics.app_id)
        assert len(running) == 3, f"demo, simulator and worker expected: {running}"
        demo.send_signal(signal.SIGTERM)
        demo.wait(60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert _wait_gone(topics.app_id) == [], output.read_text()
    assert demo.returncode == 128 + signal.SIGTERM, output.read_text()
