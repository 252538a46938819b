"""Conversation state: what the worker remembers per conversation, and its pure transitions.

One entry per conversation in the ``chat-state`` Faust table (changelog-backed, co-partitioned with
the request topic): the Vapi chat id the next turn continues from, and the ids of recently finished
requests, so that a redelivered request (after a crash or rebalance) is recognised and not sent to
Vapi again. ``ConversationStore`` is the thin wrapper over the table; everything else is pure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import faust
from faust.streams import current_event


@dataclass(frozen=True, slots=True)
class ConversationState:
    """The table value of one conversation."""

    chat_id: str | None = None
    session_id: str | None = None
    finished: tuple[str, ...] = field(default=())

    def has_finished(self, request_id: str) -> bool:
        """True when a final response for ``request_id`` was already published."""
        return request_id in self.finished

    def after_request(
        self, request_id: str, chat_id: str | None, session_id: str | None, *, keep: int
    ) -> ConversationState:
        """The state once ``request_id`` has its final response.

        A failed request keeps the old chat id (``chat_id`` None): the next turn continues from the
        last turn that worked. Only the newest ``keep`` request ids are remembered, which bounds the
        table value; a redelivery older than that is not recognised (documented limit).
        """
        finished = (*self.finished, request_id)[-keep:]
        return ConversationState(
            chat_id=chat_id if chat_id is not None else self.chat_id,
            session_id=session_id if session_id is not None else self.session_id,
            finished=finished,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "chat_id": self.chat_id,
            "session_id": self.session_id,
            "finished": list(self.finished),
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
        )


class StateTable(faust.Table[str, Any]):
    """A Faust table with a write that goes to the changelog at once, acknowledged.

    ``table[key] = value`` only queues the changelog record in Faust's producer buffer, which one
    task drains record by record; under load that lags the write by a second or more. A worker
    killed in that lag loses the "request finished" records of requests whose responses are
    already out, and answers them twice after restart. ``write_through`` sends the record itself,
    straight to the producer, and returns once the broker has it: the window shrinks to that one
    round trip, right after the response's.
    """

    async def write_through(self, key: str, value: Any, partition: int) -> None:
        """Set ``key`` locally and wait until its changelog record is on ``partition``."""
        self.data[key] = value  # the local copy, without queueing a second changelog record
        sent = await self.changelog_topic.send(
            key=key,
            value=value,
            partition=partition,
            key_serializer=self.key_serializer,
            value_serializer=self.value_serializer,
            callback=self._on_changelog_sent,  # as Faust's own writes (persisted offsets)
            force=True,  # never held back as an attachment until commit
        )
        await sent


class ConversationStore:
    """Reads and writes conversation state in the Faust table.

    Faust picks the changelog partition of a write from ``current_event()``, a context variable.
    The worker runs every request in a task created inside the agent loop while that request's
    event was current, so writes land in the request's own partition even long after the record
    was taken. ``put`` checks that, because a write to the wrong partition would be restored on
    the wrong worker after a rebalance.
    """

    def __init__(self, table: StateTable) -> None:
        self._table = table

    def get(self, conversation_id: str) -> ConversationState:
        return ConversationState.from_json(self._table.get(conversation_id))

    async def put(self, conversation_id: str, state: ConversationState, event: object) -> None:
        """Write the state and wait until its changelog record is on the broker."""
        current = current_event()
        if current is None or current is not event:
            raise RuntimeError(
                "table write outside its request's context: it would go to the wrong partition"
            )
        await self._table.write_through(conversation_id, state.to_json(), current.message.partition)
