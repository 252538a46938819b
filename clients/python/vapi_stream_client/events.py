"""The typed events a reader of the worker's output topics sees (``folding`` makes them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vapi_stream_client.messages import ChatDelta, ChatResponse

RestartReason = Literal["new_stream", "answer_is_another_stream"]


@dataclass(frozen=True, slots=True)
class Delta:
    """A fragment of reply text, to append to what its request's current stream showed."""

    record: ChatDelta

    @property
    def request_id(self) -> str:
        return self.record.request_id

    @property
    def conversation_id(self) -> str:
        return self.record.conversation_id

    @property
    def text(self) -> str:
        return self.record.delta


@dataclass(frozen=True, slots=True)
class Restart:
    """The text shown so far for ``request_id`` is void.

    ``new_stream``: a new stream (``attempt``, ``chat_id``) starts, its deltas follow.
    ``answer_is_another_stream``: the final response names another stream than the one shown;
    the ``Response`` that follows carries the answer's text. ``chat_id`` is the new stream's (or
    the answer's).
    """

    request_id: str
    conversation_id: str
    attempt: int | None
    chat_id: str | None
    reason: RestartReason


@dataclass(frozen=True, slots=True)
class Response:
    """The final response to a request: ``completed`` with the whole ``text``; ``failed``,
    ``expired`` or ``cancelled`` (``text``: what was streamed before the cancel)."""

    response: ChatResponse

    @property
    def request_id(self) -> str:
        return self.response.request_id

    @property
    def conversation_id(self) -> str:
        return self.response.conversation_id


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A record on an output topic that is not its message (not JSON, or not the contract).

    Never folded: the follower reports it instead of dropping it silently or stopping.
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    reason: str


#: What the folder makes of the output records.
Event = Delta | Restart | Response
#: What a follower yields: the folder's events, and the records it could not read.
FollowEvent = Delta | Restart | Response | Unreadable
