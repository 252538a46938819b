"""Fixtures of the end-to-end tests: each test's own topics, a simulator process, and the
worker processes of a test.

A test module whose simulator needs other arguments names them in a module-level ``SIM_ARGS``
tuple. One that needs another simulator still (another key, a process of its own per test) or
workers with other common settings defines its own ``simulator`` or ``workers`` fixture, which
takes precedence over this one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import SimulatorProcess, Topics, Workers


@pytest.fixture
def topics(unique_name: str) -> Topics:
    """Topics and a consumer group that no other test uses."""
    return Topics.unique(unique_name)


@pytest.fixture
def simulator(request: pytest.FixtureRequest) -> Iterator[SimulatorProcess]:
    """The Vapi simulator in its own process, with the workers' default key and the test
    module's ``SIM_ARGS``."""
    sim = SimulatorProcess(*getattr(request.module, "SIM_ARGS", ())).start()
    yield sim
    sim.stop()


@pytest.fixture
def workers(
    kafka_bootstrap: str, topics: Topics, simulator: SimulatorProcess, tmp_path: Path
) -> Iterator[Workers]:
    """Worker processes started by the test; any still running at its end are killed."""
    group = Workers(kafka_bootstrap, topics, simulator, tmp_path)
    yield group
    group.stop_all()
