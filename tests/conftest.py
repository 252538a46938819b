"""Fixtures shared by every test layer.

The Kafka broker is started lazily: only a test that asks for ``kafka_bootstrap`` (directly or
through another fixture) starts one, so ``pytest tests/unit`` needs neither Java nor Docker.
See ``tests/kafka_fixture.py`` for where the broker comes from.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.kafka_fixture import kafka_broker, unique_suffix


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """Bootstrap servers of a real Kafka broker, shared by the whole session."""
    with kafka_broker() as bootstrap:
        yield bootstrap


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    """A suffix for topic and consumer group names that no other test uses."""
    return unique_suffix(request.node.name)
