"""Conversation state: what the worker remembers per conversation, and its pure transitions.

One entry per conversation in the ``chat-state`` Faust table (changelog-backed, co-partitioned with
the request topic): the Vapi chat id the next turn continues from, and the ids of recently finished
requests, so that a redelivered request (after a crash or rebalance) is recognised and not sent to
Vapi again. ``ConversationStore`` is the thin wrapper over the table; everything else is pure.
"""

from __future__ import annotations

from collections.abc import Awaitable
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
    """A Faust table that keeps the future of its latest changelog send.

    Faust buffers changelog writes and flushes them before the next commit, seconds later. A
    worker killed in between would lose the "request finished" record of requests whose
    responses are already out, and answer them twice after restart. Awaiting this future before
    the request's offset is acked shrinks that window to one broker round trip.
    """

    last_changelog_send: Awaitable[Any] | None = None

    def send_changelog(self, *args: Any, **kwargs: Any) -> Any:
        future = super().send_changelog(*args, **kwargs)
        self.last_changelog_send = future
        return future


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
        if current_event() is not event:
            raise RuntimeError(
                "table write outside its request's context: it would go to the wrong partition"
            )
        self._table[conversation_id] = state.to_json()
        sent = self._table.last_changelog_send
        if sent is not None:
            await sent
