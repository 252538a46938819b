"""SSE event ids: where a browser is in its conversation's partition, and what a resume replays.

Pure. A conversation's records are in one partition of the delta topic and one of the response
topic (its key's). The gateway folds them one record at a time, in each topic's offset order, so
after every record "everything below offset ``d`` of the delta partition and below ``r`` of the
response partition has been delivered" is true. That pair is the event's id::

    <delta partition>.<d>-<response partition>.<r>            the record is delivered whole
    <delta partition>.<d>-<response partition>.<r>-<t><n>     only its first n events

One record makes at most two events (a ``restart`` and its ``delta`` or ``response``), so a
record can be half delivered; ``t`` is ``d`` or ``r``: the record is the last one read of that
topic (offset ``d - 1`` or ``r - 1``). A browser that reconnects with ``Last-Event-ID`` gets the
rest of that record's events, then every record at or above ``d`` and ``r``: nothing lost,
nothing repeated.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Literal

from vapi_stream_client import Delta, Event, Response, Restart

TopicKind = Literal["d", "r"]

_CURSOR_RE = re.compile(r"(\d{1,9})\.(\d{1,19})-(\d{1,9})\.(\d{1,19})(?:-([dr])([1-9]))?")


class CursorError(ValueError):
    """A ``Last-Event-ID`` that is not one of the gateway's, or that cannot be resumed from."""


@dataclass(frozen=True, slots=True)
class Cursor:
    """Positions in a conversation's two partitions (module docstring)."""

    delta_partition: int
    deltas: int
    response_partition: int
    responses: int
    partial: tuple[TopicKind, int] | None = None

    def encode(self) -> str:
        text = f"{self.delta_partition}.{self.deltas}-{self.response_partition}.{self.responses}"
        if self.partial is not None:
            text += f"-{self.partial[0]}{self.partial[1]}"
        return text

    @classmethod
    def parse(cls, text: str) -> Cursor:
        match = _CURSOR_RE.fullmatch(text)
        if match is None:
            raise CursorError(f"{text[:80]!r} is not an event id of this gateway")
        dp, d, rp, r, kind, sent = match.groups()
        partial: tuple[TopicKind, int] | None = None
        if kind is not None:
            partial = ("d" if kind == "d" else "r", int(sent))
            if (kind == "d" and int(d) == 0) or (kind == "r" and int(r) == 0):
                raise CursorError(f"{text!r}: a half-delivered record before offset 0")
        return cls(int(dp), int(d), int(rp), int(r), partial)

    def advanced(self, kind: TopicKind, offset: int) -> Cursor:
        """The cursor after the record at ``offset`` of the ``kind`` topic, delivered whole."""
        if kind == "d":
            return replace(self, deltas=offset + 1, partial=None)
        return replace(self, responses=offset + 1, partial=None)

    def first_unsent(self) -> tuple[int, int, int]:
        """Where a resume starts: the delta and response offsets of the first records to send,
        and how many events of the first of them were sent already."""
        if self.partial is None:
            return self.deltas, self.responses, 0
        kind, sent = self.partial
        if kind == "d":
            return self.deltas - 1, self.responses, sent
        return self.deltas, self.responses - 1, sent


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One server-sent event: its name, id and data (one line of JSON)."""

    name: str
    id: str
    data: str


def event_data(event: Event) -> tuple[str, str]:
    """The SSE name and data of a folded event: the record's own JSON for a delta and a
    response, the restart's fields for a restart."""
    if isinstance(event, Delta):
        return "delta", event.record.model_dump_json()
    if isinstance(event, Response):
        return "response", event.response.model_dump_json()
    if isinstance(event, Restart):
        return "restart", json.dumps(
            {
                "request_id": event.request_id,
                "conversation_id": event.conversation_id,
                "attempt": event.attempt,
                "chat_id": event.chat_id,
                "reason": event.reason,
            },
            separators=(",", ":"),
        )
    raise TypeError(f"not a folded event: {event!r}")  # pragma: no cover


def record_events(
    events: list[Event], after: Cursor, kind: TopicKind, skip: int = 0
) -> list[SseEvent]:
    """The SSE events of one record's folded ``events``, ``after`` being the cursor once the
    record is delivered whole; the first ``skip`` were sent before (a resume)."""
    out: list[SseEvent] = []
    for index, event in enumerate(events):
        if index < skip:
            continue
        last = index == len(events) - 1
        cursor = after if last else replace(after, partial=(kind, index + 1))
        name, data = event_data(event)
        out.append(SseEvent(name, cursor.encode(), data))
    return out
