"""``send`` and ``tail``: the worker's topics from a terminal, as other services see them.

``send`` produces one ``ChatRequest``; ``tail`` follows ``chat.deltas`` and ``chat.responses`` and
renders each conversation's text as it streams. ``TailRenderer`` is pure (records in, text out) and
does what every downstream consumer should: it drops duplicate deltas by ``(request_id, attempt,
chat_id, seq)`` and shows a restarted stream instead of gluing two streams together. A stream
restarts with a new ``attempt`` (a retry) or, after a worker crash, with a new ``chat_id`` (the
redelivered request counts its attempts from 1 again).
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from worker.config import Settings
from worker.errors import ConfigError
from worker.topics import kafka_client_kwargs


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
    """Produce one ChatRequest keyed by its conversation; returns its request_id."""
    request_id = request_id or uuid.uuid4().hex
    body: dict[str, Any] = {
        "request_id": request_id,
        "conversation_id": conversation_id,
        "input": text,
    }
    if assistant_id:
        body["assistant_id"] = assistant_id
    if reset_context:
        body["reset_context"] = True
    if metadata:
        body["metadata"] = metadata
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        enable_idempotence=True,
        **kafka_client_kwargs(settings),
    )
    await producer.start()
    try:
        await producer.send_and_wait(
            settings.topic_requests,
            json.dumps(body).encode(),
            key=conversation_id.encode(),
            headers=[("content-type", b"application/json"), ("schema", b"chat.request.v1")],
        )
    finally:
        await producer.stop()
    return request_id


@dataclass
class TailRenderer:
    """Turns delta and response records into terminal text, one conversation per line."""

    conversation: str | None = None
    _line_owner: str | None = None
    _seen: set[tuple[str, int, str, int]] = field(default_factory=set)
    _stream: dict[str, tuple[int, str]] = field(default_factory=dict)

    def on_delta(self, delta: dict[str, Any]) -> str:
        conversation = str(delta.get("conversation_id"))
        if self.conversation is not None and conversation != self.conversation:
            return ""
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
        conversation = str(response.get("conversation_id"))
        if self.conversation is not None and conversation != self.conversation:
            return ""
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
    from_beginning: bool = False,
    until_responses: int | None = None,
    out: TextIO = sys.stdout,
    on_ready: Callable[[], None] | None = None,
    raw_json: bool = False,
) -> int:
    """Follow the delta and response topics; returns the number of responses seen."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        enable_auto_commit=False,
        group_id=None,
        **kafka_client_kwargs(settings),
    )
    await consumer.start()
    renderer = TailRenderer(conversation)
    responses = 0
    try:
        await assign_all(
            consumer,
            [settings.topic_deltas, settings.topic_responses],
            from_beginning=from_beginning,
        )
        if on_ready is not None:
            on_ready()
        while until_responses is None or responses < until_responses:
            batch = await consumer.getmany(timeout_ms=200)
            for tp, records in batch.items():
                for record in records:
                    value = json.loads(record.value or b"null")
                    if raw_json:
                        out.write(json.dumps({"topic": tp.topic, "value": value}) + "\n")
                    elif tp.topic == settings.topic_deltas:
                        out.write(renderer.on_delta(value))
                    else:
                        out.write(renderer.on_response(value))
                    if tp.topic == settings.topic_responses and (
                        conversation is None or value.get("conversation_id") == conversation
                    ):
                        responses += 1
                out.flush()
    finally:
        await consumer.stop()
    return responses


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
        await consumer._client.force_metadata_update()
        await asyncio.sleep(0.2)
    raise ConfigError(f"topic {topic!r} does not exist")


async def assign_all(
    consumer: AIOKafkaConsumer, topics: list[str], *, from_beginning: bool
) -> list[TopicPartition]:
    """Assign every partition of ``topics`` and fix the start position before returning.

    The positions are resolved here, so records produced after this returns are never missed
    (no race between a follower starting and a producer sending).
    """
    partitions: list[TopicPartition] = []
    for topic in topics:
        partitions += await topic_partitions(consumer, topic)
    consumer.assign(partitions)
    if from_beginning:
        await consumer.seek_to_beginning(*partitions)
    else:
        await consumer.seek_to_end(*partitions)
    for tp in partitions:
        await consumer.position(tp)
    return partitions
