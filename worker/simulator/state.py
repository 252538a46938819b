"""The simulator's memory: chats, sessions, the call log and the counters tests read back.

Why: the worker's correctness shows in what it sent to Vapi (which ``previousChatId``, which
attempt, how many at once), so every ``/chat`` call is recorded, and conversation context is kept
the way Vapi keeps it: a chat stores its whole transcript, ``previousChatId`` continues from one
chat, ``sessionId`` from the latest chat of a session. Nothing here does I/O; one event loop owns
the state, so plain dicts and lists need no locks.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from worker.simulator.errors import ChatRejectedError
from worker.simulator.faults import FaultBook, FetchFault
from worker.simulator.pricing import chat_costs, count_tokens, prompt_tokens
from worker.simulator.validation import ChatInput, CreateChatBody

ORG_ID = "sim-org"
Message = dict[str, object]


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class StoredChat:
    """One chat: the context it was given (``messages``) and what the assistant answered."""

    id: str
    owner: str | None
    assistant_id: str | None
    session_id: str | None
    previous_chat_id: str | None
    name: str | None
    messages: list[Message]
    output: list[Message]
    created_at: str = field(default_factory=_now_iso)
    #: Faults of ``GET /chat/{id}`` for this chat (``fetch``), and how many GETs it has had.
    fetch_faults: tuple[FetchFault, ...] = ()
    fetches: int = 0

    @property
    def prompt_tokens(self) -> int:
        """Tokens the model read: the whole context (``messages``)."""
        return prompt_tokens(self.messages)

    @property
    def completion_tokens(self) -> int:
        """Tokens the model wrote: the reply."""
        return sum(
            count_tokens(content)
            for message in self.output
            if isinstance(content := message.get("content"), str)
        )

    def fetch_fault(self) -> FetchFault | None:
        """Count one ``GET /chat/{id}``; the fault it must answer with, if any."""
        self.fetches += 1
        for fault in self.fetch_faults:
            if fault.gets is None or self.fetches <= fault.gets:
                return fault
        return None

    @property
    def transcript(self) -> list[Message]:
        """Everything said so far, which is the next turn's history."""
        return [*self.messages, *self.output]

    def to_json(self) -> dict[str, object]:
        """The chat as Vapi's ``Chat`` object (optional fields only when set)."""
        optional = {
            "assistantId": self.assistant_id,
            "sessionId": self.session_id,
            "previousChatId": self.previous_chat_id,
            "name": self.name,
        }
        cost, costs = chat_costs(self.prompt_tokens, self.completion_tokens)
        return {
            "id": self.id,
            "orgId": ORG_ID,
            **{k: v for k, v in optional.items() if v is not None},
            "messages": self.messages,
            "output": self.output,
            "createdAt": self.created_at,
            "updatedAt": self.created_at,
            "cost": cost,
            "costs": costs,
        }


@dataclass
class Session:
    """A Vapi session: tied to one assistant, continuing from its latest chat."""

    id: str
    owner: str | None
    transcript: list[Message] = field(default_factory=list)


@dataclass(frozen=True)
class Context:
    """Where a new chat starts from: earlier messages and who is answering."""

    history: list[Message]
    owner: str | None
    assistant_id: str | None


@dataclass
class CallRecord:
    """One ``POST /chat`` as ``GET /_sim/calls`` reports it."""

    request_id: str | None
    attempt: int | None
    started_at: float = field(default_factory=time.time)
    assistant_id: str | None = None
    previous_chat_id: str | None = None
    session_id: str | None = None
    input: ChatInput | None = None
    chat_id: str | None = None
    status: int | None = None
    fault: str | None = None
    deltas_sent: int = 0
    ended_at: float | None = None
    outcome: str | None = None

    def note_request(self, request: CreateChatBody) -> None:
        """Copy the request's identifying fields once the body has been validated."""
        self.assistant_id = request.assistant_id
        self.previous_chat_id = request.previous_chat_id
        self.session_id = request.session_id
        self.input = request.input

    def to_json(self) -> dict[str, object]:
        """The record as JSON."""
        return asdict(self)


@dataclass
class Stats:
    """Counters for benchmarks: calls seen and streams open now and at the peak."""

    calls: int = 0
    streams_in_flight: int = 0
    peak_streams_in_flight: int = 0
    #: Calls answered 429 because the organisation's limit (``--max-chats``) was reached.
    over_limit: int = 0

    def stream_opened(self) -> None:
        """Count a stream that started sending."""
        self.streams_in_flight += 1
        self.peak_streams_in_flight = max(self.peak_streams_in_flight, self.streams_in_flight)

    def stream_closed(self) -> None:
        """Count a stream that ended, however it ended."""
        self.streams_in_flight -= 1

    def reset(self) -> None:
        """Start a new measurement: the peak restarts from the streams open right now."""
        self.calls = 0
        self.over_limit = 0
        self.peak_streams_in_flight = self.streams_in_flight


class SimulatorState:
    """Everything the simulator remembers between calls."""

    def __init__(self, faults: FaultBook | None = None) -> None:
        self.calls: list[CallRecord] = []
        self.chats: dict[str, StoredChat] = {}
        self.sessions: dict[str, Session] = {}
        self.stats = Stats()
        self.delta_times: dict[str, list[float]] = {}
        self.faults = faults or FaultBook()

    def begin_call(self, request_id: str | None, attempt: int | None) -> CallRecord:
        """Record a new ``/chat`` call as soon as it arrives."""
        record = CallRecord(request_id=request_id, attempt=attempt)
        self.calls.append(record)
        self.stats.calls += 1
        return record

    def resolve_context(self, request: CreateChatBody) -> Context:
        """Find the history a request continues from, or refuse it as Vapi would (404/400)."""
        if request.previous_chat_id is not None:
            return self._from_chat(request, request.previous_chat_id)
        if request.session_id is not None:
            return self._from_session(request, request.session_id)
        return Context(history=[], owner=request.owner, assistant_id=request.assistant_id)

    def _from_chat(self, request: CreateChatBody, chat_id: str) -> Context:
        chat = self.chats.get(chat_id)
        if chat is None:
            raise ChatRejectedError(404, f"Chat {chat_id} not found (previousChatId)")
        if request.owner is not None and request.owner != chat.owner:
            raise ChatRejectedError(
                400, f"previousChatId {chat_id} belongs to a chat with a different assistant"
            )
        return Context(chat.transcript, chat.owner, request.assistant_id or chat.assistant_id)

    def _from_session(self, request: CreateChatBody, session_id: str) -> Context:
        session = self.sessions.get(session_id)
        if session is None:
            if request.owner is None:
                raise ChatRejectedError(404, f"Session {session_id} not found")
            session = self.sessions[session_id] = Session(session_id, request.owner)
        elif request.owner is not None and request.owner != session.owner:
            raise ChatRejectedError(400, f"Session {session_id} is tied to a different assistant")
        return Context(list(session.transcript), session.owner, request.assistant_id)

    def new_chat(
        self,
        request: CreateChatBody,
        context: Context,
        messages: list[Message],
        reply: str,
        fetch_faults: tuple[FetchFault, ...] = (),
    ) -> StoredChat:
        """A chat for this turn; it is not remembered until ``commit`` (a broken stream is not)."""
        return StoredChat(
            id=f"chat_{uuid.uuid4().hex}",
            owner=context.owner,
            assistant_id=context.assistant_id,
            session_id=request.session_id,
            previous_chat_id=request.previous_chat_id,
            name=request.name,
            messages=[*context.history, *messages],
            output=[{"role": "assistant", "content": reply}],
            fetch_faults=fetch_faults,
        )

    def commit(self, chat: StoredChat) -> None:
        """Remember a chat whose reply was delivered whole; it may now be continued."""
        self.chats[chat.id] = chat
        if chat.session_id is not None and chat.session_id in self.sessions:
            self.sessions[chat.session_id].transcript = chat.transcript
