"""``send`` and ``tail``: the worker's topics from a terminal, as other services see them.

``send`` produces one ``ChatRequest`` to an existing request topic; ``tail`` follows
``chat.deltas`` and ``chat.responses`` and renders each conversation's text as it streams.
``tail`` starts at the topics' end, at a time (``since_ms``) or at their beginning; following one
request it starts at the beginning unless told a time, so it finds that request's reply whether
it starts before or after the reply was published, and it stops after that request's final
response. ``TailRenderer`` is pure (records in, text out) and does what every downstream
consumer should: it drops duplicate deltas by ``(request_id, attempt, chat_id, seq)`` and shows a
restarted stream instead of gluing two streams together. A stream restarts with a new
``attempt`` (a retry) or, after a worker crash, with a new ``chat_id`` (the redelivered request
counts its attempts from 1 again).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from pydantic import ValidationError

from worker.config import Settings
from worker.errors import ConfigError
from worker.kafka_adapters import refresh_metadata
from worker.messages import ChatRequest
from worker.topics import kafka_client_kwargs


def new_request(
    conversation_id: str,
    text: str,
    *,
    request_id: str | None = None,
    assistant_id: str | None = None,
    reset_context: bool = False,
    metadata: dict[str, Any] | None = None,
) -> ChatRequest:
    """The ``ChatRequest`` that ``send`` produces: a new request id unless one is given.

    An empty ``assistant_id`` or ``metadata`` is left out. What the message contract refuses (an
    empty or too long id) is a ``ConfigError`` naming the field, instead of a record the worker
    would dead-letter.
    """
    try:
        return ChatRequest(
            request_id=request_id or uuid.uuid4().hex,
            conversation_id=conversation_id,
            input=text,
            assistant_id=assistant_id or None,
            reset_context=reset_context,
            metadata=metadata or None,
        )
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors(include_url=False, include_input=False)
        )
        raise ConfigError(f"not a valid {ChatRequest.SCHEMA} request: {problems}") from None


def request_headers() -> list[tuple[str, bytes]]:
    """The headers of a request record: its content type and schema name."""
    return [("content-type", b"application/json"), ("schema", ChatRequest.SCHEMA.encode())]


async def send_request(
    settings: Settings,
    conversation_id: str,
    text: str,
    *,
    request_id: str | None = None,
    assistant_id: str | None = None,
    reset_context: bool = False,
    metadata: dict[str, Any] | None = None,
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
    )
    await require_topic(settings, settings.topic_requests)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        enable_idempotence=True,
        **kafka_client_kwargs(settings),
    )
    await producer.start()
    try:
        await producer.send_and_wait(
            settings.topic_requests,
            request.encode(),
            key=request.conversation_id.encode(),
            headers=request_headers(),
        )
    finally:
        await producer.stop()
    return request.request_id


async def require_topic(settings: Settings, topic: str, *, timeout_s: float = 20.0) -> None:
    """Return once ``topic`` exists (waiting up to ``timeout_s`` for a starting worker to create
    it), without creating it; ``ConfigError`` otherwise."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        enable_auto_commit=False,
        group_id=None,
        **kafka_client_kwargs(settings),
    )
    await consumer.start()
    try:
        await topic_partitions(consumer, topic, timeout_s=timeout_s)
    except ConfigError as exc:
        raise ConfigError(
            f"{exc}: start the worker (it creates its topics) or create it with "
            "TOPIC_PARTITIONS partitions"
        ) from exc
    finally:
        await consumer.stop()


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
    """Turns delta and response records into terminal text, one conversation per line.

    With ``conversation`` or ``request_id`` set, records of other conversations or requests
    render as nothing (``wants`` says which records count).
    """

    conversation: str | None = None
    request_id: str | None = None
    _line_owner: str | None = None
    _seen: set[tuple[str, int, str, int]] = field(default_factory=set)
    _stream: dict[str, tuple[int, str]] = field(default_factory=dict)

    def wants(self, record: object) -> bool:
        """Whether a delta or response belongs to what this renderer follows."""
        if not isinstance(record, dict):
            return False
        if self.conversation is not None and record.get("conversation_id") != self.conversation:
            return False
        return self.request_id is None or record.get("request_id") == self.request_id

    def on_delta(self, delta: dict[str, Any]) -> str:
        if not self.wants(delta):
            return ""
        conversation = str(delta.get("conversation_id"))
        request_id = str(delta.get("request_id"))
        attempt, seq = int(delta.get("attempt", 1)), int(delta.get("seq", 0))
        stream = (attempt, str(delta.get("chat_id")))
        if (request_id, *stream, seq) in self._seen:
            return ""  # a redelivered delta: at-least-once means consumers dedupe
        self._seen.add((request_id, *stream, seq))
        out = self._switch_line(conversation)
        last = self._stream.get(request_id)
        if last is not None and stream != last:
            out += f" [stream restarted, attempt {attempt}] "
        self._stream[request_id] = stream
        return out + str(delta.get("delta", ""))

    def on_response(self, response: dict[str, Any]) -> str:
        if not self.wants(response):
            return ""
        conversation = str(response.get("conversation_id"))
        request_id = str(response.get("request_id"))
        self._stream.pop(request_id, None)
        self._seen = {key for key in self._seen if key[0] != request_id}
        if response.get("status") == "completed":
            status = f"completed, {response.get('delta_count')} deltas"
            if response.get("context_reset"):
                status += ", context reset"
        else:
            error = response.get("error") or {}
            status = f"FAILED {error.get('code')}: {error.get('message')}"
        out = self._switch_line(conversation) if self._line_owner != conversation else ""
        self._line_owner = None
        return f"{out}\n  └─ {status} (request {request_id})\n"

    def _switch_line(self, conversation: str) -> str:
        if self._line_owner == conversation:
            return ""
        prefix = "\n" if self._line_owner is not None else ""
        self._line_owner = conversation
        return f"{prefix}[{conversation}] "


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
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        enable_auto_commit=False,
        group_id=None,
        **kafka_client_kwargs(settings),
    )
    await consumer.start()
    follower = _Follower(
        consumer,
        settings,
        TailRenderer(conversation, request_id),
        out,
        raw_json=raw_json,
        request_id=request_id,
        until_responses=until_responses,
    )
    try:
        await assign_all(
            consumer,
            [settings.topic_deltas, settings.topic_responses],
            from_beginning=from_beginning or (request_id is not None and since_ms is None),
            since_ms=since_ms,
        )
        if on_ready is not None:
            on_ready()
        while not follower.done():
            await follower.step()
    finally:
        await consumer.stop()
    return follower.finals


@dataclass
class _Follower:
    """``tail``'s loop: which records it shows, in which order, and when it is done.

    A request's deltas are all on the broker before its final response is sent, but the two
    topics are read independently: reading a backlog, a final could come before its text. So
    deltas are shown before responses, and before each response every delta published so far.
    """

    consumer: AIOKafkaConsumer
    settings: Settings
    renderer: TailRenderer
    out: TextIO
    raw_json: bool
    request_id: str | None
    until_responses: int | None
    finals: list[dict[str, Any]] = field(default_factory=list)

    def done(self) -> bool:
        if self.request_id is not None:
            return bool(self.finals)  # only that request's responses are followed
        return self.until_responses is not None and len(self.finals) >= self.until_responses

    async def step(self) -> None:
        batch = await self.consumer.getmany(timeout_ms=200)
        for tp in sorted(batch, key=lambda tp: tp.topic != self.settings.topic_deltas):
            for record in batch[tp]:
                value = json.loads(record.value or b"null")
                if self.done() or not self.renderer.wants(value):
                    continue
                if tp.topic == self.settings.topic_responses:
                    await self._catch_up_deltas()
                    self.finals.append(value)
                self._write(tp.topic, value)
        self.out.flush()

    async def _catch_up_deltas(self) -> None:
        """Show the deltas published before now, up to the delta topic's end offsets."""
        partitions = [
            tp for tp in self.consumer.assignment() if tp.topic == self.settings.topic_deltas
        ]
        ends = await self.consumer.end_offsets(partitions)
        while [tp for tp in partitions if await self.consumer.position(tp) < ends[tp]]:
            batch = await self.consumer.getmany(*partitions, timeout_ms=200)
            for tp, records in batch.items():
                for record in records:
                    value = json.loads(record.value or b"null")
                    if self.renderer.wants(value):
                        self._write(tp.topic, value)

    def _write(self, topic: str, value: dict[str, Any]) -> None:
        if self.raw_json:
            self.out.write(json.dumps({"topic": topic, "value": value}) + "\n")
        elif topic == self.settings.topic_deltas:
            self.out.write(self.renderer.on_delta(value))
        else:
            self.out.write(self.renderer.on_response(value))


async def topic_partitions(
    consumer: AIOKafkaConsumer, topic: str, *, timeout_s: float = 20.0
) -> list[TopicPartition]:
    """Every partition of ``topic``, once the consumer's metadata knows it.

    A topic that does not appear within ``timeout_s`` is a ``ConfigError`` naming it, instead of
    a consumer that silently reads nothing.
    """
    for _ in range(max(1, int(timeout_s / 0.2))):
        found = consumer.partitions_for_topic(topic)
        if found:
            return [TopicPartition(topic, p) for p in sorted(found)]
        await refresh_metadata(consumer)
        await asyncio.sleep(0.2)
    raise ConfigError(f"topic {topic!r} does not exist")


async def assign_all(
    consumer: AIOKafkaConsumer,
    topics: list[str],
    *,
    from_beginning: bool,
    since_ms: int | None = None,
) -> list[TopicPartition]:
    """Assign every partition of ``topics`` and fix the start position before returning.

    The start is the beginning, else the first record at or after ``since_ms`` (the end where
    there is none), else the end. The positions are resolved here, so records produced after
    this returns are never missed (no race between a follower starting and a producer sending).
    """
    partitions: list[TopicPartition] = []
    for topic in topics:
        partitions += await topic_partitions(consumer, topic)
    consumer.assign(partitions)
    if from_beginning:
        await consumer.seek_to_beginning(*partitions)
    elif since_ms is not None:
        found = await consumer.offsets_for_times(dict.fromkeys(partitions, since_ms))
        ends = await consumer.end_offsets(partitions)
        for tp in partitions:
            start = found.get(tp)
            consumer.seek(tp, start.offset if start is not None else ends[tp])
    else:
        await consumer.seek_to_end(*partitions)
    for tp in partitions:
        await consumer.position(tp)
    return partitions
