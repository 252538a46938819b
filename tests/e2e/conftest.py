"""Fixtures of the end-to-end tests: each test's own topics, and a simulator process.

A test module that needs another simulator (other arguments, another key) defines its own
``simulator`` fixture, which takes precedence over this one.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.harness import SimulatorProcess, Topics


@pytest.fixture
def topics(unique_name: str) -> Topics:
    """Topics and a consumer group that no other test uses."""
    return Topics.unique(unique_name)


@pytest.fixture
def simulator() -> Iterator[SimulatorProcess]:
    """The Vapi simulator in its own process, with the workers' default key."""
    sim = SimulatorProcess().start()
    yield sim
    sim.stop()
