"""Which failures stop the worker: the loss of Kafka, and nothing else.

A request's path can raise anything: Vapi's answers are mapped to ``VapiError`` and end the
request by design, but a bug, or an answer nobody planned for, raises whatever it raises. Two
kinds are told apart here:

* Kafka refused or lost one of the worker's writes (a delta, a response, a dead letter, the
  ``chat-state`` changelog): no request can be finished in this process. The worker stops without
  acking the record, and its partitions move to a replica that can write; nothing is lost.
* Anything else is one request's trouble, a bug included: that request ends with a ``failed``
  response (``error.code = internal_error``), and the partition goes on. A Kafka error about the
  one record (larger than the producer or the broker accepts) is such trouble too: no other
  replica could write that record either, so stopping would only hand the crash on.

Pure: a classification of exception types, no I/O.
"""

from __future__ import annotations

from typing import Final

from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordTooLargeError
from faust.exceptions import NotReady, ProducerSendError

__all__ = ["stops_the_worker"]

#: Kafka's refusals of one record, not of the worker: the request ends, the worker goes on.
_RECORD_REFUSED: Final = (MessageSizeTooLargeError, RecordTooLargeError)
#: Kafka itself failing: aiokafka's errors, Faust's wrapper of them on a send, and Faust's
#: "producer not started / not connected".
_KAFKA_LOST: Final = (KafkaError, ProducerSendError, NotReady)


def stops_the_worker(exc: BaseException) -> bool:
    """True when ``exc`` means Kafka is gone; False when it is one request's trouble.

    Faust wraps aiokafka's error in ``ProducerSendError``; the cause decides then.
    """
    cause = exc.__cause__ if isinstance(exc, ProducerSendError) else None
    if isinstance(exc, _RECORD_REFUSED) or isinstance(cause, _RECORD_REFUSED):
        return False
    return isinstance(exc, _KAFKA_LOST)
