"""``send`` and ``tail``: the worker's topics from a terminal, as other services see them.

Both are thin over the client distribution (``vapi_stream_client``): ``send`` produces one
``ChatRequest`` to an existing request topic with ``ChatClient.send``; ``tail`` follows
``chat.deltas`` and ``chat.responses`` with ``ChatClient.follow``, whose events already have the
duplicates dropped and the restarted streams marked (the reading rules live there, once), and
renders each conversation's text as it streams. ``tail`` starts at the topics' end, at a time
(``since_ms``) or at their beginning; following one request it starts at the beginning unless
told a time, so it finds that request's reply whether it starts before or after the reply was
published, and it stops after that request's final response. ``TailRenderer`` is pure (events
in, text out).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from vapi_stream_client import (
    ChatClient,
    Delta,
    FollowEvent,
    InvalidRequestError,
    Response,
    Restart,
    TopicMissingError,
    Topics,
)
from vapi_stream_client import new_cancel as client_cancel
from vapi_stream_client import new_request as client_request
from vapi_stream_client.messages import request_headers as request_headers
from worker.config import Settings
from worker.errors import ConfigError
from worker.messages import ChatRequest, Cost
from worker.topics import kafka_client_kwargs


def new_request(
    conversation_id: str,
    text: str,
    *,
    request_id: str | None = None,
    assistant_id: str | None = None,
    reset_context: bool = False,
    metadata: dict[str, Any] | None = None,
    supersede: bool = False,
) -> ChatRequest:
    """The ``ChatRequest`` that ``send`` produces: a new request id unless one is given.

    An empty ``assistant_id`` or ``metadata`` is left out. What the message contract refuses (an
    empty or too long id) is a ``ConfigError`` naming the field, instead of a record the worker
    would dead-letter.
    """
    try:
        return client_request(
            conversation_id,
            text,
            request_id=request_id,
            assistant_id=assistant_id or None,
            reset_context=reset_context,
            metadata=metadata or None,
            supersede=supersede,
        )
    except InvalidRequestError as exc:
        raise ConfigError(str(exc)) from None


def chat_client(settings: Settings) -> ChatClient:
    """The client on the worker's broker and topics, with its SASL/TLS settings."""
    return ChatClient(
        settings.kafka_bootstrap_servers,
        topics=Topics(
            requests=settings.topic_requests,
            deltas=settings.topic_deltas,
            responses=settings.topic_responses,
        ),
        kafka_options=kafka_client_kwargs(settings),
    )


async def send_request(
    settings: Settings,
    conversation_id: str,
    text: str,
    *,
    request_id: str | None = None,
    assistant_id: str | None = None,
    reset_context: bool = False,
    metadata: dict[str, Any] | None = None,
    supersede: bool = False,
) -> str:
    """Produce one ChatRequest keyed by its conversation; returns its request_id.

    The request is checked first (``new_request``). The request topic must exist
    (``ConfigError`` naming it otherwise): producing to a missing topic would let the broker
    create it with its default partition count, which the worker then refuses to start with.
    """
    request = new_request(
        conversation_id,
        text,
        request_id=request_id,
        assistant_id=assistant_id,
        reset_context=reset_context,
        metadata=metadata,
        supersede=supersede,
    )
    try:
        async with chat_client(settings) as client:
            return await client.send_request(request)
    except TopicMissingError as exc:
        raise _missing_topic(exc) from exc


async def send_cancel(
    settings: Settings, conversation_id: str, request_id: str | None = None
) -> None:
    """Produce one ChatCancel keyed by its conversation: ``request_id``, or every request of the
    conversation the worker took before it. A refused id is a ``ConfigError`` naming the field;
    a missing request topic too, as for ``send_request``."""
    try:
        client_cancel(conversation_id, request_id)
    except InvalidRequestError as exc:
        raise ConfigError(str(exc)) from None
    try:
        async with chat_client(settings) as client:
            await client.cancel(conversation_id, request_id)
    except TopicMissingError as exc:
        raise _missing_topic(exc) from exc


def _missing_topic(exc: TopicMissingError) -> ConfigError:
    return ConfigError(
        f"{exc}: start the worker (it creates its topics) or create it with "
        "TOPIC_PARTITIONS partitions"
    )


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: datetime) -> int:
    """``tail --since``: a duration before ``now`` (``90s``, ``10m``, ``2h``, ``1d``) or an ISO
    8601 time (UTC unless it names an offset), as Kafka's milliseconds since the epoch."""
    duration = _DURATION.fullmatch(text.strip())
    if duration:
        start = now - timedelta(seconds=float(duration[1]) * _UNIT_S[duration[2]])
    else:
        try:
            start = datetime.fromisoformat(text.strip())
        except ValueError:
            raise ValueError(
                f"{text!r} is neither a duration (90s, 10m, 2h, 1d) nor an ISO 8601 time"
            ) from None
        if start.tzinfo is None:
            start = start.replace(tzinfo=UTC)
    return int(start.timestamp() * 1000)


@dataclass
class TailRenderer:
    """Turns the client's events into terminal text, one conversation per line."""

    _line_owner: str | None = None

    def render(self, event: FollowEvent) -> str:
        if isinstance(event, Delta):
            return self._switch_line(event.conversation_id) + event.text
        if isinstance(event, Restart):
            out = self._switch_line(event.conversation_id)
            if event.reason == "new_stream":
                return out + f" [stream restarted, attempt {event.attempt}] "
            return out + " [the answer is another stream] "
        if isinstance(event, Response):
            return self._on_response(event)
        where = f"{event.topic}[{event.partition}]@{event.offset}"
        out = "\n" if self._line_owner is not None else ""
        self._line_owner = None
        return f"{out}[unreadable record {where}: {event.reason}]\n"

    def _on_response(self, event: Response) -> str:
        response = event.response
        conversation = response.conversation_id
        if response.status == "completed":
            status = f"completed, {response.delta_count} deltas"
            if response.context_reset:
                status += ", context reset"
            status += _cost_text(response.cost)
        elif response.status == "expired":
            reason = response.error.message if response.error else "expired"
            status = f"EXPIRED, not run: {reason}"
        elif response.status == "cancelled":
            reason = response.error.message if response.error else "cancelled"
            status = f"CANCELLED after {response.delta_count} deltas: {reason}"
        else:
            error = response.error
            status = f"FAILED {error.code}: {error.message}" if error else "FAILED"
        out = self._switch_line(conversation) if self._line_owner != conversation else ""
        self._line_owner = None
        if response.stream_complete is False:
            # The deltas stopped short of the reply: show the whole of it, from Vapi's chat.
            out += f"\n  └─ the stream ended early; the whole reply: {response.text}"
        return f"{out}\n  └─ {status} (request {response.request_id})\n"

    def _switch_line(self, conversation: str) -> str:
        if self._line_owner == conversation:
            return ""
        prefix = "\n" if self._line_owner is not None else ""
        self._line_owner = conversation
        return f"{prefix}[{conversation}] "


def event_json(event: FollowEvent, topics: Topics) -> str:
    """``tail --json``: a delta or response as its topic and record, a restart or an unreadable
    record as what it is."""
    if isinstance(event, Delta):
        line: dict[str, Any] = {"topic": topics.deltas, "value": event.record.model_dump()}
    elif isinstance(event, Response):
        line = {"topic": topics.responses, "value": event.response.model_dump()}
    elif isinstance(event, Restart):
        line = {
            "restart": {
                "request_id": event.request_id,
                "conversation_id": event.conversation_id,
                "attempt": event.attempt,
                "chat_id": event.chat_id,
                "reason": event.reason,
            }
        }
    else:
        line = {
            "unreadable": {
                "topic": event.topic,
                "partition": event.partition,
                "offset": event.offset,
                "reason": event.reason,
            }
        }
    return json.dumps(line) + "\n"


def _cost_text(cost: Cost | None) -> str:
    """``, 0.000215 USD (6 + 20 tokens)`` for a response's ``cost``; nothing when unknown."""
    if cost is None:
        return ""
    return f", {cost.usd:.6f} USD ({cost.prompt_tokens} + {cost.completion_tokens} tokens)"


async def tail(
    settings: Settings,
    *,
    conversation: str | None = None,
    request_id: str | None = None,
    from_beginning: bool = False,
    since_ms: int | None = None,
    until_responses: int | None = None,
    out: TextIO = sys.stdout,
    on_ready: Callable[[], None] | None = None,
    raw_json: bool = False,
) -> list[dict[str, Any]]:
    """Follow the delta and response topics; returns the final responses that were followed.

    It stops after ``until_responses`` of them, or with ``request_id`` after that request's
    final response. Following a request without ``since_ms`` starts at the topics' beginning.
    """
    renderer = TailRenderer()
    finals: list[dict[str, Any]] = []

    def done() -> bool:
        if request_id is not None:
            return bool(finals)  # only that request's responses are followed
        return until_responses is not None and len(finals) >= until_responses

    start_at_beginning = from_beginning or (request_id is not None and since_ms is None)
    try:
        async with (
            chat_client(settings) as client,
            client.follow(
                conversation_id=conversation,
                request_id=request_id,
                start="beginning" if start_at_beginning else "end",
                since_ms=since_ms,
            ) as follower,
        ):
            if on_ready is not None:
                on_ready()
            while not done():
                for event in await follower.poll():
                    if done():
                        break
                    if isinstance(event, Response):
                        finals.append(event.response.model_dump(mode="json"))
                    out.write(
                        event_json(event, client.topics) if raw_json else renderer.render(event)
                    )
                out.flush()
    except TopicMissingError as exc:
        raise ConfigError(str(exc)) from exc
    return finals
