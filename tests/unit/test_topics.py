"""``plan_topics``: which topics the worker creates, and with how many partitions."""

from __future__ import annotations

import ssl

import faust
import pytest

from worker.config import Settings
from worker.errors import ConfigError
from worker.topics import (
    TopicPlan,
    changelog_topic,
    faust_credentials,
    kafka_client_kwargs,
    plan_topics,
)

pytestmark = pytest.mark.unit

SETTINGS = Settings(worker_app_id="app", topic_partitions=8)
CHANGELOG = "app-chat-state-changelog"
OUTPUTS = ("chat.deltas", "chat.responses", "chat.requests.dlq")


def test_the_changelog_is_named_after_the_app_and_the_table() -> None:
    """Faust names a table's changelog ``<app id>-<table>-changelog``."""
    assert changelog_topic(SETTINGS) == CHANGELOG


def test_on_an_empty_cluster_every_topic_is_created_with_topic_partitions() -> None:
    """Nothing exists: the request topic and the outputs get TOPIC_PARTITIONS partitions."""
    assert plan_topics(SETTINGS, {}) == TopicPlan(8, ("chat.requests", *OUTPUTS))


def test_an_existing_request_topic_sets_the_count_for_the_missing_outputs() -> None:
    """The request topic's count wins over TOPIC_PARTITIONS; only missing topics are created."""
    plan = plan_topics(SETTINGS, {"chat.requests": 3, "chat.responses": 12})
    assert plan == TopicPlan(3, ("chat.deltas", "chat.requests.dlq"))


def test_a_changelog_that_agrees_with_the_request_topic_is_kept() -> None:
    """A changelog with the request topic's count is the table's own from an earlier run."""
    existing = {"chat.requests": 3, CHANGELOG: 3, **dict.fromkeys(OUTPUTS, 3)}
    assert plan_topics(SETTINGS, existing) == TopicPlan(3, ())


def test_a_changelog_that_disagrees_with_the_request_topic_is_refused() -> None:
    """State kept for other partitions would not follow its conversations: a clear error."""
    with pytest.raises(ConfigError) as caught:
        plan_topics(SETTINGS, {"chat.requests": 3, CHANGELOG: 2})
    message = str(caught.value)
    assert message.startswith(
        f"the changelog topic {CHANGELOG!r} has 2 partitions but the request topic "
        "'chat.requests' has 3"
    )
    assert "delete" in message


def test_a_changelog_that_disagrees_with_a_request_topic_to_be_created_is_refused() -> None:
    """No request topic yet: the changelog is compared with TOPIC_PARTITIONS, nothing created."""
    with pytest.raises(ConfigError, match="has 5 partitions but the request topic"):
        plan_topics(SETTINGS, {CHANGELOG: 5})


def test_faust_and_the_aiokafka_clients_get_the_same_credentials() -> None:
    """One source for both: PLAINTEXT has none, SSL a context, SASL the mechanism and login."""
    assert faust_credentials(Settings(kafka_security_protocol="PLAINTEXT")) is None
    assert isinstance(faust_credentials(Settings(kafka_security_protocol="SSL")), ssl.SSLContext)
    settings = Settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="worker",
        kafka_sasl_password="s3cret",
    )
    credentials = faust_credentials(settings)
    kwargs = kafka_client_kwargs(settings)
    assert isinstance(credentials, faust.SASLCredentials)
    assert (credentials.username, credentials.password) == ("worker", "s3cret")
    assert credentials.mechanism.value == kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert isinstance(credentials.ssl_context, ssl.SSLContext)
    plain = faust_credentials(Settings(kafka_security_protocol="SASL_PLAINTEXT"))
    assert (plain.mechanism.value, plain.ssl_context) == ("PLAIN", None)
