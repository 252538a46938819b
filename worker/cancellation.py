"""Which requests a cancel ends, and what it tells them (docs/design.md §5.8). Pure: no I/O.

Two records cancel requests: a ``chat.cancel.v1`` (its ``request_id``, or without one every
request of its conversation) and a request with ``supersede: true`` (every earlier request of its
conversation but an earlier copy of itself: a producer's retried send must not cancel the request
it repeats). Either reaches only the requests of its partition taken before it and not yet
finished; the dispatcher applies it when it takes the record, ahead of the conversation's queue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from worker.messages import ChatCancel, ChatRequest

__all__ = ["Cancellation", "cancellation_by", "targets"]


@dataclass(frozen=True, slots=True)
class Cancellation:
    """Why a request is cancelled, as its ``cancelled`` response says, and when it was asked."""

    #: The response's ``error.code``.
    code: Literal["cancelled", "superseded"]
    message: str
    #: ``time.monotonic()`` when the cancelling record was taken.
    read_at: float


def targets(by: ChatCancel | ChatRequest, earlier: ChatRequest) -> bool:
    """Whether ``by`` (taken after ``earlier``, on its partition) cancels ``earlier``."""
    if earlier.conversation_id != by.conversation_id:
        return False
    if isinstance(by, ChatCancel):
        return by.request_id is None or by.request_id == earlier.request_id
    return by.supersede and by.request_id != earlier.request_id


def cancellation_by(
    by: ChatCancel | ChatRequest, *, partition: int, offset: int, read_at: float
) -> Cancellation:
    """What a request cancelled by ``by`` (read from ``partition`` at ``offset``) is told."""
    if isinstance(by, ChatCancel):
        return Cancellation(
            "cancelled",
            f"cancelled by the chat.cancel.v1 record at partition {partition}, offset {offset}",
            read_at,
        )
    return Cancellation("superseded", f"superseded by request {by.request_id[:80]!r}", read_at)
