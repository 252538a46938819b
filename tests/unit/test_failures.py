"""Only the loss of Kafka stops the worker; every other exception is one request's trouble."""

from __future__ import annotations

import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    ProducerClosed,
    RecordTooLargeError,
)
from faust.exceptions import NotReady, ProducerSendError
from pydantic import BaseModel, Field, ValidationError

from worker.failures import stops_the_worker

pytestmark = pytest.mark.unit


def _wrapped(cause: BaseException) -> ProducerSendError:
    """What Faust's ``send`` raises for an aiokafka error."""
    try:
        raise ProducerSendError(f"Error while sending: {cause!r}") from cause
    except ProducerSendError as exc:
        return exc


def _validation_error() -> ValidationError:
    class Status(BaseModel):
        code: int = Field(le=599)

    try:
        Status(code=999)
    except ValidationError as exc:
        return exc
    raise AssertionError("999 passed validation")


@pytest.mark.parametrize(
    "exc",
    [
        KafkaTimeoutError("no broker answered"),
        KafkaConnectionError("connection refused"),
        NotLeaderForPartitionError(),
        ProducerClosed(),
        NotReady("Producer service not yet started"),
        _wrapped(KafkaTimeoutError()),
    ],
    ids=repr,
)
def test_kafka_failing_stops_the_worker(exc: BaseException) -> None:
    """Kafka's own failures, raw or wrapped by Faust, mean no request can finish here."""
    assert stops_the_worker(exc)


@pytest.mark.parametrize(
    "exc",
    [
        MessageSizeTooLargeError("the message is 2000000 bytes"),
        RecordTooLargeError(),
        _wrapped(MessageSizeTooLargeError()),
        _validation_error(),
        KeyError("a bug"),
        TypeError("a bug"),
        RuntimeError("table write outside its request's context"),
        OSError("disk"),
    ],
    ids=repr,
)
def test_anything_else_is_one_requests_trouble(exc: BaseException) -> None:
    """A record Kafka refuses for its size, and every non-Kafka exception, end one request."""
    assert not stops_the_worker(exc)
