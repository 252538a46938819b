"""Conversation state: what the worker remembers per conversation, and its pure transitions.

One entry per conversation in the ``chat-state`` Faust table (changelog-backed, co-partitioned with
the request topic): the Vapi chat id the next turn continues from, where in the request topic its
newest finished request sits, the ids of recently finished requests, and when its last request
finished (wall clock), which decides when an idle conversation expires. A redelivered request
(after a crash or rebalance) is recognised by its position and not sent to Vapi again, however
many records lie between it and the committed offset; the ids catch a producer that sends the
same request twice. ``ConversationStore`` is the thin wrapper over the table (``StateTable``, in
``worker.kafka_adapters`` with Faust's other adapters); everything else is pure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.kafka_adapters import StateTable


@dataclass(frozen=True, slots=True)
class SourcePosition:
    """Where request records sit in the request topic: partition, offset, timestamp in ms."""

    partition: int
    offset: int
    timestamp_ms: int

    def covers(self, record: SourcePosition) -> bool:
        """True when ``record`` is at or before this position: same partition, offset, time.

        The timestamp tells a redelivery from a record of a request topic that was deleted and
        created again (its offsets restart at 0): a redelivered record keeps the timestamp it
        was produced with, at most the newest one finished, while a record of the new topic was
        produced after every record of the old one.
        """
        return (
            record.partition == self.partition
            and record.offset <= self.offset
            and record.timestamp_ms <= self.timestamp_ms
        )

    def to_json(self) -> dict[str, int]:
        return {
            "partition": self.partition,
            "offset": self.offset,
            "timestamp_ms": self.timestamp_ms,
        }

    @classmethod
    def from_json(cls, value: Any) -> SourcePosition | None:
        """Read a stored position; anything unreadable counts as "no position known"."""
        if not isinstance(value, dict):
            return None
        fields: list[int] = []
        for name in ("partition", "offset", "timestamp_ms"):
            field_value = value.get(name)
            if not isinstance(field_value, int) or isinstance(field_value, bool) or field_value < 0:
                return None
            fields.append(field_value)
        partition, offset, timestamp_ms = fields
        return cls(partition, offset, timestamp_ms)


@dataclass(frozen=True, slots=True)
class ConversationState:
    """The table value of one conversation.

    ``last_finished`` holds the partition and offset of the conversation's newest finished
    request, and the newest timestamp among the requests finished since that offset series
    began. A conversation's records are all in one partition and run one at a time in offset
    order, so every record of it at or before that position has finished too.
    """

    chat_id: str | None = None
    session_id: str | None = None
    finished: tuple[str, ...] = field(default=())
    last_finished: SourcePosition | None = None
    #: When the conversation's last request finished, ms since the epoch; None: not known.
    last_active_ms: int | None = None
    #: USD Vapi billed for the conversation's completed replies (for its budget).
    spent_usd: float = 0.0

    def has_finished(self, request_id: str, source: SourcePosition | None = None) -> bool:
        """True when a final response for this request was already published.

        ``source`` is the position of the record being handled: a record at or before
        ``last_finished`` has finished, however old; a request id among the newest finished ones
        has too (a producer that sent the same request twice).
        """
        if request_id in self.finished:
            return True
        return (
            source is not None
            and self.last_finished is not None
            and self.last_finished.covers(source)
        )

    def after_request(
        self,
        request_id: str,
        chat_id: str | None,
        session_id: str | None,
        *,
        keep: int,
        source: SourcePosition | None = None,
        active_ms: int | None = None,
        cost_usd: float = 0.0,
    ) -> ConversationState:
        """The state once ``request_id``, read at ``source``, got its final response.

        ``active_ms`` is when that happened (wall clock, ms): it becomes ``last_active_ms``.

        A failed request keeps the old chat id (``chat_id`` None): the next turn continues from the
        last turn that worked. Only the newest ``keep`` request ids are remembered, which bounds the
        table value. A record past ``last_finished`` moves it forward, keeping the newest
        timestamp; any other record (another partition, or a lower offset that is no redelivery:
        the topic started over) starts the position afresh. Without ``source`` it stays, and
        without ``active_ms`` so does ``last_active_ms``. ``cost_usd`` (what the reply cost) adds
        to ``spent_usd``; nothing, ``reset_context`` included, takes from it.
        """
        finished = (*self.finished, request_id)[-keep:]
        return ConversationState(
            chat_id=chat_id if chat_id is not None else self.chat_id,
            session_id=session_id if session_id is not None else self.session_id,
            finished=finished,
            last_finished=self._position_after(source),
            last_active_ms=active_ms if active_ms is not None else self.last_active_ms,
            spent_usd=self.spent_usd + cost_usd,
        )

    def _position_after(self, source: SourcePosition | None) -> SourcePosition | None:
        last = self.last_finished
        if source is None:
            return last
        if last is None or source.partition != last.partition or source.offset <= last.offset:
            return source
        return SourcePosition(
            source.partition, source.offset, max(source.timestamp_ms, last.timestamp_ms)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "chat_id": self.chat_id,
            "session_id": self.session_id,
            "finished": list(self.finished),
            "last_finished": None if self.last_finished is None else self.last_finished.to_json(),
            "last_active_ms": self.last_active_ms,
            "spent_usd": self.spent_usd,
        }

    @classmethod
    def from_json(cls, value: Any) -> ConversationState:
        """Read a table value; anything unreadable counts as a fresh conversation."""
        if not isinstance(value, dict):
            return cls()
        finished = value.get("finished")
        return cls(
            chat_id=value.get("chat_id") if isinstance(value.get("chat_id"), str) else None,
            session_id=value.get("session_id")
            if isinstance(value.get("session_id"), str)
            else None,
            finished=tuple(r for r in finished if isinstance(r, str))
            if isinstance(finished, list)
            else (),
            last_finished=SourcePosition.from_json(value.get("last_finished")),
            last_active_ms=value_last_active_ms(value),
            spent_usd=_spent_usd(value.get("spent_usd")),
        )


def _spent_usd(value: Any) -> float:
    """A stored spend; anything unreadable (or a value written before the field) is 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value) if math.isfinite(value) and value >= 0 else 0.0


def value_last_active_ms(value: Any) -> int | None:
    """When a table value's conversation last finished a request; None when it does not say."""
    if not isinstance(value, dict):
        return None
    found = value.get("last_active_ms")
    if not isinstance(found, int) or isinstance(found, bool) or found < 0:
        return None
    return found


def with_last_active(value: Any, default_ms: int) -> Any:
    """``value`` with ``last_active_ms`` set to ``default_ms`` where it has none (a new dict).

    Values written before the field existed are stamped with the time of their changelog record
    when they are read back: a value was written when its conversation's last request finished,
    so the record's time is when that conversation was last active. Other values are returned
    as they are.
    """
    if not isinstance(value, dict) or value_last_active_ms(value) is not None:
        return value
    return {**value, "last_active_ms": default_ms}


class ConversationStore:
    """Reads and writes conversation state in the Faust table.

    A write names its changelog partition: the partition of the request it records, which is
    the conversation's (docs/design.md §10.3). Faust's own ``table[key] = value`` would take it
    from ``current_event()`` instead, a context variable that only a task created inside the
    agent loop sees.
    """

    def __init__(self, table: StateTable) -> None:
        self._table = table

    def get(self, conversation_id: str) -> ConversationState:
        return ConversationState.from_json(self._table.get(conversation_id))

    async def put(self, conversation_id: str, state: ConversationState, partition: int) -> None:
        """Write the state to changelog ``partition``; returns once the broker has it."""
        await self._table.write_through(conversation_id, state.to_json(), partition)
