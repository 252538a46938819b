"""The cheap paths of scripts/local-kafka.sh and the broker choice of tests/kafka_fixture.py.

Nothing here starts Java or reaches a registry: the script runs only its argument handling, its
cached `jars` path and `status`; the broker sources are replaced by fakes.
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import kafka_fixture
from tests.kafka_fixture import LOCAL_KAFKA_SCRIPT, free_ports, unique_suffix

pytestmark = pytest.mark.unit


def run_script(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(LOCAL_KAFKA_SCRIPT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture
def script_env(tmp_path: Path) -> dict[str, str]:
    """An environment with bash tools but no mvn or java on PATH, and an unused port."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "cat", "dirname", "find", "wc", "grep", "tr", "mkdir", "rm", "flock"):
        for directory in ("/usr/bin", "/bin"):
            if (Path(directory) / tool).exists():
                (bin_dir / tool).symlink_to(Path(directory) / tool)
                break
    port, controller_port = free_ports(2)
    return {
        "PATH": str(bin_dir),
        "KAFKA_JARS_DIR": str(tmp_path / "libs"),
        "LOCAL_KAFKA_PORT": str(port),
        "LOCAL_KAFKA_CONTROLLER_PORT": str(controller_port),
    }


def test_unknown_subcommand_prints_usage_and_exits_2(script_env: dict[str, str]) -> None:
    """An unknown subcommand prints the usage line and exits with status 2."""
    result = run_script("start", env=script_env)
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_jars_with_stamp_does_not_run_maven(script_env: dict[str, str], tmp_path: Path) -> None:
    """`jars` does nothing (and needs no mvn) once the stamp file for the pinned versions exists."""
    script = LOCAL_KAFKA_SCRIPT.read_text()
    kafka = re.search(r"^readonly PINNED_KAFKA_VERSION=(\S+)$", script, re.MULTILINE)
    log4j = re.search(r"^readonly PINNED_LOG4J_VERSION=(\S+)$", script, re.MULTILINE)
    assert kafka
    assert log4j
    libs = tmp_path / "libs"
    libs.mkdir()
    (libs / ".complete").write_text(f"kafka_2.13-{kafka[1]} log4j-{log4j[1]}\n")

    result = run_script("jars", env=script_env)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_jars_without_maven_fails_clearly(script_env: dict[str, str]) -> None:
    """`jars` without a cache and without mvn on PATH fails and says what to install."""
    result = run_script("jars", env=script_env)
    assert result.returncode == 1
    assert "mvn not found" in result.stderr


def test_status_of_a_broker_not_started_exits_3(script_env: dict[str, str]) -> None:
    """`status` for a port with no broker started by the script exits 3 and says so."""
    result = run_script("status", env=script_env)
    assert result.returncode == 3
    assert "not running" in result.stderr


def test_unique_suffix_is_topic_safe_and_unique() -> None:
    """The suffix keeps only characters legal in topic names and differs on every call."""
    first = unique_suffix("test_x[param/1 é]")
    second = unique_suffix("test_x[param/1 é]")
    assert first != second
    assert re.fullmatch(r"[A-Za-z0-9._-]+", first)
    assert first.startswith("test_x-param-1-")


def test_free_ports_are_distinct_and_bindable() -> None:
    """free_ports returns distinct ports on 127.0.0.1 that can be bound right after."""
    ports = free_ports(2)
    assert len(set(ports)) == 2
    with contextlib.ExitStack() as stack:
        for port in ports:
            stack.enter_context(socket.socket()).bind(("127.0.0.1", port))


def test_configured_bootstrap_is_used_without_starting_anything(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reachable KAFKA_BOOTSTRAP_SERVERS wins over Docker and the local broker."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        bootstrap = f"127.0.0.1:{listener.getsockname()[1]}"
        monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
        monkeypatch.setattr(kafka_fixture, "docker_available", _must_not_be_called)
        monkeypatch.setattr(kafka_fixture, "_start_local", _must_not_be_called)
        with kafka_fixture.kafka_broker() as got:
            assert got == bootstrap


def test_failed_container_falls_back_to_local_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    """When Docker answers but the container does not start, the local broker is used."""
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.setattr(kafka_fixture, "docker_available", lambda: True)
    monkeypatch.setattr(kafka_fixture, "_start_container", _raise(RuntimeError("pull denied")))
    monkeypatch.setattr(kafka_fixture, "_start_local", lambda cleanup: "127.0.0.1:1234")
    with kafka_fixture.kafka_broker() as got:
        assert got == "127.0.0.1:1234"


def test_no_broker_at_all_fails_instead_of_skipping(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no source of a broker the fixture fails the test, naming every reason."""
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.setattr(kafka_fixture, "docker_available", lambda: False)
    monkeypatch.setattr(
        kafka_fixture, "_start_local", _raise(kafka_fixture.BrokerStartError("java not found"))
    )
    with pytest.raises(pytest.fail.Exception, match="java not found"), kafka_fixture.kafka_broker():
        pass


def _must_not_be_called(*args: object) -> object:
    raise AssertionError("must not be called")


def _raise(exc: Exception) -> Callable[..., object]:
    def fail(*args: object) -> object:
        raise exc

    return fail
