"""What the client raises: ``ClientError`` and its kinds, each message saying what to do."""

from __future__ import annotations


class ClientError(Exception):
    """Something the client cannot do as asked."""


class InvalidRequestError(ClientError, ValueError):
    """The request does not fit ``chat.request.v1`` (the message names each field and rule), or
    its key or headers are not what the contract needs. Nothing was produced."""


class TopicMissingError(ClientError):
    """A topic the client needs does not exist. The client never lets the broker create one: it
    would get the broker's default partition count, which the worker refuses."""


class AskTimeoutError(ClientError, TimeoutError):
    """``ask`` saw no final response to its request in time; the request may still run."""

    def __init__(self, message: str, *, request_id: str) -> None:
        super().__init__(message)
        self.request_id = request_id
