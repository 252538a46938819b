"""Every command README.md, the Dockerfile and docker-compose.yml show, run as written.

The commands are read from the files (tests/documented.py), against the real broker, the real
simulator and real worker processes. What differs from the documents, and why; nothing else does:

- Docker is not here. A compose service or a ``docker run`` runs its image's entrypoint
  (``vapi-worker``) with the same arguments and the environment Docker would give it, from an
  empty working directory (as the image's WORKDIR) with its own ``TMPDIR``.
- Addresses: the broker is the test session's (for ``kafka:9092``, or the README's
  ``scripts/local-kafka.sh up``), the simulator listens on a free port (for ``simulator:8080``
  or ``8089``), and the ops port is a free port (Docker's ``-p`` mapping has no equivalent here,
  and other processes on a test machine may hold 6066).
- Topic names and the consumer group are the test's own (``TOPIC_*``, ``WORKER_APP_ID``), so
  tests do not read each other's records.
- The real Vapi API, for a ``docker run`` that passes ``VAPI_API_KEY``, is the simulator:
  ``VAPI_BASE_URL`` points at it and the key is its key (no real key is available to tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
import pytest

from tests.documented import (
    README_BROKER_LINE,
    ROOT,
    ComposeRun,
    DockerRun,
    compose_file,
    compose_image_services,
    compose_steps,
    dockerfile_cmd,
    dockerfile_steps,
    make_targets,
    readme_steps,
)
from tests.e2e.harness import OutputReader, Topics, free_port
from tests.kafka_fixture import create_topics
from worker.config import Settings

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

VAPI_WORKER = str(Path(sys.executable).with_name("vapi-worker"))
#: How long one documented command may take before it counts as hanging.
COMMAND_TIMEOUT_S = 90
#: README make targets no test runs, and why.
MAKE_TARGETS_NOT_RUN = {
    "test": "it is this test suite; CI runs it (.ci/run, tests/unit/test_readme.py)",
}
#: The key the real Vapi API would take; the simulator stands in for it.
SIM_KEY = "sim-key"


def settings_names() -> set[str]:
    return {name.upper() for name in Settings.model_fields}


def base_env() -> dict[str, str]:
    """The test process's environment without any worker setting (those come from the document)."""
    return {k: v for k, v in os.environ.items() if k not in settings_names() and k != "TMPDIR"}


def compose_partitions() -> int:
    """The partition count the compose ``topics`` job creates the topics with."""
    (count,) = re.findall(r"--partitions (\d+)", compose_file()["services"]["topics"]["command"][0])
    return int(count)


class Process:
    """A documented long-running command (a worker or the simulator) in its own process."""

    def __init__(self, argv: list[str], env: Mapping[str, str], workdir: Path, log: Path) -> None:
        self.argv = argv
        self.workdir = workdir
        self.log_path = log
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            argv, cwd=workdir, env=dict(env), stdout=self._log, stderr=subprocess.STDOUT
        )

    def wait_http(self, url: str, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"{shlex.join(self.argv)} exited {self.proc.returncode}:\n{self.tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            time.sleep(0.2)
        pytest.fail(f"{url} of {shlex.join(self.argv)} not ready in {timeout_s} s:\n{self.tail()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class ComposeStack:
    """The compose services built from this project's image, as ``docker compose up`` runs them."""

    def __init__(self, bootstrap: str, topics: Topics, tmp_path: Path) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.tmp_path = tmp_path
        self.simulator_url = ""
        self.processes: dict[str, Process] = {}

    def service_env(self, name: str) -> dict[str, str]:
        """The service's compose environment, addresses and names swapped as the module says."""
        env = {k: str(v) for k, v in compose_image_services()[name].get("environment", {}).items()}
        if "KAFKA_BOOTSTRAP_SERVERS" in env:
            env["KAFKA_BOOTSTRAP_SERVERS"] = self.bootstrap
        if "VAPI_BASE_URL" in env:
            env["VAPI_BASE_URL"] = self.simulator_url
        if "WORKER_HTTP_PORT" in env:
            env["WORKER_HTTP_PORT"] = str(free_port())
        return {**base_env(), **env, **self.topics.env()}

    def up(self) -> None:
        """Start the simulator, then every worker replica; wait until each is ready."""
        services = compose_image_services()
        (simulator,) = [n for n, s in services.items() if s["command"][0] == "simulator"]
        argv = list(services[simulator]["command"])
        port = free_port()
        argv[argv.index("--port") + 1] = str(port)
        self.simulator_url = f"http://127.0.0.1:{port}"
        self.processes[simulator] = self._start(simulator, argv, self.service_env(simulator))
        self.processes[simulator].wait_http(f"{self.simulator_url}/healthz")
        for name, service in services.items():
            if name != simulator:
                env = self.service_env(name)
                self.processes[name] = self._start(name, list(service["command"]), env)
                ops = env["WORKER_HTTP_PORT"]
                self.processes[name].wait_http(f"http://127.0.0.1:{ops}/readyz")

    def _start(self, name: str, args: list[str], env: dict[str, str]) -> Process:
        workdir = self.tmp_path / f"{name}-workdir"
        workdir.mkdir()
        (self.tmp_path / f"{name}-tmp").mkdir()
        env["TMPDIR"] = str(self.tmp_path / f"{name}-tmp")
        return Process([VAPI_WORKER, *args], env, workdir, self.tmp_path / f"{name}.log")

    def down(self) -> dict[str, int]:
        """Stop every service (SIGTERM, as compose does); their exit codes."""
        return {name: proc.stop() for name, proc in reversed(self.processes.items())}


@contextlib.contextmanager
def compose_stack(bootstrap: str, topics: Topics, tmp_path: Path) -> Iterator[ComposeStack]:
    stack = ComposeStack(bootstrap, topics, tmp_path)
    try:
        yield stack
    finally:
        codes = stack.down()
    assert codes == dict.fromkeys(codes, 0), f"services did not stop cleanly: {codes}"


def run_cli(argv: list[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """A one-off documented command; a command still running after the timeout hangs: fail."""
    try:
        return subprocess.run(
            [VAPI_WORKER, *argv],
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        pytest.fail(f"`{shlex.join(argv)}` hung: still running after {COMMAND_TIMEOUT_S} s\n{out}")


def check_ok(argv: list[str], result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (
        f"`{shlex.join(argv)}` exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


# ---------------------------------------------------------------------------------------------
# docker-compose.yml


async def _compose_topics(bootstrap: str, topics: Topics) -> None:
    """What the compose ``topics`` job does: the four topics, with its partition count."""
    names = [topics.requests, topics.deltas, topics.responses, topics.dlq]
    await create_topics(bootstrap, names, partitions=compose_partitions())


async def test_compose_commands_run_in_order_with_each_reply_published_before_the_next(
    kafka_bootstrap: str, unique_name: str, tmp_path: Path
) -> None:
    """The compose file's commands in their order: ``up`` starts every service this project's
    image runs, each one-off command exits 0, and a command after a ``send`` starts only once
    the simulator's reply is on the broker (the slowest operator). A ``tail`` shows the reply
    and exits; the services stop cleanly (exit 0 on SIGTERM)."""
    steps = compose_steps()
    assert steps[0] == "up", "the compose comments start the stack first"
    assert any(isinstance(s, ComposeRun) and s.args[0] == "tail" for s in steps)
    topics = Topics.unique(unique_name)
    await _compose_topics(kafka_bootstrap, topics)
    shown: list[str] = []
    async with OutputReader(kafka_bootstrap, topics) as reader:
        with compose_stack(kafka_bootstrap, topics, tmp_path) as stack:
            for step in steps:
                if step == "up":
                    await asyncio.to_thread(stack.up)
                    continue
                assert isinstance(step, ComposeRun)
                env = stack.service_env(step.service)
                result = await asyncio.to_thread(run_cli, step.args, env)
                out = check_ok(step.args, result)
                if step.args[0] == "send":
                    request_id = out.strip().splitlines()[-1]
                    await reader.wait_for_responses([request_id], timeout_s=COMMAND_TIMEOUT_S)
                elif step.args[0] == "tail":
                    shown.append(out)
    assert {r["status"] for r in reader.outputs.responses} == {"completed"}
    for out in shown:
        assert "└─ completed" in out, out
        assert any(r["text"] in out for r in reader.outputs.responses), out


def test_compose_tail_commands_started_before_the_sends_show_the_replies(
    kafka_bootstrap: str, unique_name: str, tmp_path: Path
) -> None:
    """The other order: every ``tail`` of the compose comments starts first, then the sends run;
    each tail shows its reply and exits 0."""
    steps = [s for s in compose_steps() if isinstance(s, ComposeRun)]
    tails = [s for s in steps if s.args[0] == "tail"]
    others = [s for s in steps if s.args[0] != "tail"]
    topics = Topics.unique(unique_name)
    asyncio.run(_compose_topics(kafka_bootstrap, topics))
    with compose_stack(kafka_bootstrap, topics, tmp_path) as stack:
        stack.up()
        followers = [
            subprocess.Popen(
                [VAPI_WORKER, *s.args],
                env=stack.service_env(s.service),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for s in tails
        ]
        try:
            for step in others:
                check_ok(step.args, run_cli(step.args, stack.service_env(step.service)))
            for step, follower in zip(tails, followers, strict=True):
                try:
                    out, _ = follower.communicate(timeout=COMMAND_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    pytest.fail(f"`{shlex.join(step.args)}` started first hung")
                assert follower.returncode == 0, out
                assert "└─ completed" in out, out
        finally:
            for follower in followers:
                if follower.poll() is None:
                    follower.kill()
                    follower.communicate()


# ---------------------------------------------------------------------------------------------
# Dockerfile


def docker_run_env(run: DockerRun, bootstrap: str, simulator_url: str) -> dict[str, str]:
    """The environment ``docker run``'s ``-e`` options give the container, as the module says.

    ``-e NAME`` takes the operator's shell value: an assistant id for VAPI_ASSISTANT_ID, the
    simulator's key for VAPI_API_KEY. Only names the command passes reach the worker.
    """
    shell = {"VAPI_ASSISTANT_ID": "sim-assistant", "VAPI_API_KEY": SIM_KEY}
    env: dict[str, str] = {}
    for name, value in run.env.items():
        if name == "KAFKA_BOOTSTRAP_SERVERS":
            env[name] = bootstrap
        elif name == "VAPI_API_KEY":
            env[name] = SIM_KEY
            env["VAPI_BASE_URL"] = simulator_url
        elif value is None:
            env[name] = shell[name]
        else:
            env[name] = value
    return env


def test_dockerfile_docker_run_commands_start_a_ready_worker_that_writes_only_to_tmp(
    kafka_bootstrap: str, unique_name: str, tmp_path: Path
) -> None:
    """Each ``docker run`` the Dockerfile shows, with the environment its ``-e`` options give:
    the worker reaches ready, leaves its working directory (the image's WORKDIR) untouched and
    keeps Faust's data directory under TMPDIR, and exits 0 on SIGTERM."""
    runs = [s for s in dockerfile_steps() if isinstance(s, DockerRun)]
    assert runs, "the Dockerfile shows how to run the image"
    topics = Topics.unique(unique_name)
    port = free_port()
    simulator = Process(
        [VAPI_WORKER, "simulator", "--port", str(port), "--api-key", SIM_KEY],
        base_env(),
        tmp_path,
        tmp_path / "simulator.log",
    )
    try:
        simulator.wait_http(f"http://127.0.0.1:{port}/healthz")
        for number, run in enumerate(runs):
            workdir, tmpdir = tmp_path / f"workdir-{number}", tmp_path / f"tmp-{number}"
            workdir.mkdir()
            tmpdir.mkdir()
            http_port = free_port()
            env = {
                **base_env(),
                **docker_run_env(run, kafka_bootstrap, f"http://127.0.0.1:{port}"),
                **topics.env(),
                "WORKER_HTTP_PORT": str(http_port),
                "TMPDIR": str(tmpdir),
            }
            args = run.args or dockerfile_cmd()
            worker = Process([VAPI_WORKER, *args], env, workdir, tmp_path / f"run-{number}.log")
            try:
                worker.wait_http(f"http://127.0.0.1:{http_port}/readyz")
                assert list(workdir.iterdir()) == []
                assert [p.name for p in tmpdir.iterdir() if p.name.startswith("vapi-worker-")]
            finally:
                code = worker.stop()
            assert code == 0, worker.tail()
    finally:
        simulator.stop()


# ---------------------------------------------------------------------------------------------
# README.md


def _readme_env(bootstrap: str, topics: Topics) -> dict[str, str]:
    return {
        **base_env(),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "WORKER_HTTP_PORT": str(free_port()),
        **topics.env(),
    }


def test_readme_make_targets_run(kafka_bootstrap: str, unique_name: str) -> None:
    """Each ``make`` target the README's blocks show exits 0 (``make test`` is this suite)."""
    blocks = [block for kind, block in readme_steps() if kind == "make"]
    targets = [t for block in blocks for t in make_targets(block)]
    assert set(MAKE_TARGETS_NOT_RUN) <= set(targets), "an exemption names no README target"
    env = _readme_env(kafka_bootstrap, Topics.unique(unique_name))
    for target in targets:
        if target in MAKE_TARGETS_NOT_RUN:
            continue
        result = subprocess.run(
            ["make", target],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, f"make {target}:\n{result.stdout}\n{result.stderr}"


def test_readme_by_hand_block_shows_both_replies(
    kafka_bootstrap: str, unique_name: str, tmp_path: Path
) -> None:
    """The README's by-hand block as one script (its broker line aside): it ends after showing
    both replies, and the second remembers the name the first turn gave."""
    (block,) = [block for kind, block in readme_steps() if kind == "by-hand"]
    lines = block.splitlines()
    broker_lines = [i for i, line in enumerate(lines) if line.startswith(README_BROKER_LINE)]
    assert len(broker_lines) == 1, "the block starts its broker with scripts/local-kafka.sh"
    del lines[broker_lines[0]]
    script = "\n".join(lines)
    (sim_port,) = set(re.findall(r"simulator --port (\d+)", script))
    script = script.replace(sim_port, str(free_port()))
    env = _readme_env(kafka_bootstrap, Topics.unique(unique_name))
    out_path = tmp_path / "by-hand.out"
    with out_path.open("wb") as out:
        shell = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = shell.wait(COMMAND_TIMEOUT_S * 2)
        except subprocess.TimeoutExpired:
            code = None
        shown = out_path.read_text(errors="replace")
        _stop_group(shell.pid)
    assert code == 0, f"the block exited {code}:\n{shown}"
    finals = shown.split("└─ ")
    assert len(finals) == 3, f"the block ended without showing both replies:\n{shown}"
    assert all(final.startswith("completed") for final in finals[1:]), shown
    assert "Alice" in finals[1], f"the second reply forgot the name:\n{shown}"


def _stop_group(pgid: int) -> None:
    """SIGTERM the script's background jobs (simulator, worker), then SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
