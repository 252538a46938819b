"""The Kafka side: send requests, follow the output topics, ask and await an answer.

``ChatClient`` produces with an idempotent producer (``acks=all``), keyed by the conversation id
and with the request's content type and schema headers. It never lets the broker create a topic
(one created that way would get the broker's default partition count, which the worker refuses):
a topic it needs and cannot see within ``topic_wait_s`` is a ``TopicMissingError``.

``Follower`` reads the delta and response topics without a consumer group and hands every record
to a ``StreamFolder`` (``vapi_stream_client.folding``): the events it yields already have the
duplicates dropped and the restarts marked. Following one conversation it reads only the
partition that conversation's key maps to in each topic, computed with Kafka's default
partitioner (murmur2 of the key, as aiokafka's and the Java client's). A request's deltas are on
the broker before its final response is sent, but the two topics are read independently: before
a response is folded, every delta published until then is read, so a backlog never shows a final
before its text.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal, Self

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.client import AIOKafkaClient
from aiokafka.partitioner import murmur2
from pydantic import ValidationError

from vapi_stream_client.errors import (
    AskTimeoutError,
    ClientError,
    InvalidRequestError,
    TopicMissingError,
)
from vapi_stream_client.events import Event, FollowEvent, Response, Unreadable
from vapi_stream_client.folding import StreamFolder
from vapi_stream_client.messages import (
    CANCEL_SCHEMA,
    ChatCancel,
    ChatDelta,
    ChatInput,
    ChatRequest,
    ChatResponse,
)
from vapi_stream_client.messages import request_headers as contract_headers

#: Where a follower starts: the topics' end (what is published from now on) or their beginning.
Start = Literal["end", "beginning"]

#: How long one poll of the topics waits for records.
POLL_MS: Final = 200
#: Header names the client writes itself: a caller's header of the same name is refused.
_CONTRACT_HEADER_NAMES: Final = frozenset(name for name, _ in contract_headers())


@dataclass(frozen=True)
class Topics:
    """The worker's topic names (its ``TOPIC_*`` settings; these are its defaults)."""

    requests: str = "chat.requests"
    deltas: str = "chat.deltas"
    responses: str = "chat.responses"


def partition_for(key: str | bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner puts a record with ``key`` on."""
    if partitions < 1:
        raise ValueError("a topic has at least one partition")
    data = key.encode() if isinstance(key, str) else key
    return int(murmur2(data) & 0x7FFFFFFF) % partitions


def new_request(
    conversation_id: str,
    input: ChatInput | list[dict[str, Any]],
    *,
    request_id: str | None = None,
    assistant_id: str | None = None,
    assistant_overrides: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    reset_context: bool = False,
    supersede: bool = False,
) -> ChatRequest:
    """A ``ChatRequest`` with a new request id unless one is given.

    What the contract refuses is an ``InvalidRequestError`` naming each field and rule.
    """
    try:
        return ChatRequest.model_validate(
            {
                "request_id": uuid.uuid4().hex if request_id is None else request_id,
                "conversation_id": conversation_id,
                "input": input,
                "assistant_id": assistant_id,
                "assistant_overrides": assistant_overrides,
                "metadata": metadata,
                "reset_context": reset_context,
                "supersede": supersede,
            }
        )
    except ValidationError as exc:
        raise InvalidRequestError(_problems(ChatRequest.SCHEMA, exc)) from None


def new_cancel(conversation_id: str, request_id: str | None = None) -> ChatCancel:
    """A ``ChatCancel`` of ``request_id``, or of every request of the conversation taken before it.

    What the contract refuses is an ``InvalidRequestError`` naming each field and rule.
    """
    try:
        return ChatCancel.model_validate(
            {"schema": CANCEL_SCHEMA, "conversation_id": conversation_id, "request_id": request_id}
        )
    except ValidationError as exc:
        raise InvalidRequestError(_problems(ChatCancel.SCHEMA, exc)) from None


def _problems(schema: str, exc: ValidationError) -> str:
    problems = "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or 'message'}: {error['msg']}"
        for error in exc.errors(include_url=False, include_input=False)
    )
    return f"not a valid {schema} message: {problems}"


def _checked_headers(headers: Sequence[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    checked: list[tuple[str, bytes]] = []
    for header in headers:
        if not (isinstance(header, tuple) and len(header) == 2):
            raise InvalidRequestError(f"a header must be a (name, value) pair, not {header!r}")
        name, value = header
        if not isinstance(name, str) or not isinstance(value, bytes):
            raise InvalidRequestError(
                f"header {name!r}: the name must be a str and the value bytes, "
                f"not {type(name).__name__} and {type(value).__name__}"
            )
        if name.lower() in _CONTRACT_HEADER_NAMES:
            raise InvalidRequestError(f"header {name!r} is the client's own; leave it out")
        checked.append((name, value))
    return checked


class ChatClient:
    """A producing or consuming service's handle on the worker's topics.

    ``kafka_options`` go to every aiokafka client it creates: the connection's
    ``security_protocol``, ``ssl_context``, ``sasl_mechanism``, ``sasl_plain_username``,
    ``sasl_plain_password``, ``client_id``. Use it as ``async with ChatClient(...) as client``.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        topics: Topics | None = None,
        topic_wait_s: float = 20.0,
        kafka_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(bootstrap_servers, str) or not bootstrap_servers:
            raise ValueError("bootstrap_servers must be a non-empty str, such as 'kafka:9092'")
        self.bootstrap_servers = bootstrap_servers
        self.topics = topics or Topics()
        self.topic_wait_s = topic_wait_s
        self.kafka_options = dict(kafka_options or {})
        self._metadata: AIOKafkaClient | None = None
        self._producer: AIOKafkaProducer | None = None
        self._known_topics: set[str] = set()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Connect for metadata; the producer starts with the first send."""
        if self._metadata is None:
            metadata = AIOKafkaClient(
                bootstrap_servers=self.bootstrap_servers, **self.kafka_options
            )
            await metadata.bootstrap()
            self._metadata = metadata

    async def stop(self) -> None:
        """Flush and stop the producer, close the metadata connection."""
        producer, self._producer = self._producer, None
        metadata, self._metadata = self._metadata, None
        try:
            if producer is not None:
                await producer.stop()
        finally:
            if metadata is not None:
                await metadata.close()

    # --- producing --------------------------------------------------------------------------

    async def send(
        self,
        conversation_id: str,
        input: ChatInput | list[dict[str, Any]],
        *,
        request_id: str | None = None,
        assistant_id: str | None = None,
        assistant_overrides: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        reset_context: bool = False,
        supersede: bool = False,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> str:
        """Produce one request keyed by its conversation; returns its ``request_id`` once the
        broker has it (all in-sync replicas). ``supersede``: the conversation's earlier requests
        still queued or streaming are cancelled before it runs."""
        request = new_request(
            conversation_id,
            input,
            request_id=request_id,
            assistant_id=assistant_id,
            assistant_overrides=assistant_overrides,
            metadata=metadata,
            reset_context=reset_context,
            supersede=supersede,
        )
        return await self.send_request(request, headers=headers)

    async def send_request(
        self, request: ChatRequest, *, headers: Sequence[tuple[str, bytes]] = ()
    ) -> str:
        """Produce a request built beforehand (``new_request``); ``headers`` are extra ones
        (trace context: ``traceparent``, ``x-request-id``...), which the worker echoes."""
        if not isinstance(request, ChatRequest):
            raise InvalidRequestError(
                f"send_request takes a ChatRequest, not {type(request).__name__}"
            )
        extra = _checked_headers(headers)
        producer = await self._started_producer()
        await producer.send_and_wait(
            self.topics.requests,
            request.encode(),
            key=request.conversation_id.encode(),
            headers=[*contract_headers(), *extra],
        )
        return request.request_id

    async def cancel(
        self,
        conversation_id: str,
        request_id: str | None = None,
        *,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        """Produce a ``chat.cancel.v1`` keyed by the conversation; returns once the broker has it.

        With ``request_id``: that request; without: every request of the conversation the worker
        took before this cancel. Each cancelled request, queued or streaming, ends with one
        ``status: "cancelled"`` response; a request already finished is not affected.
        """
        cancel = new_cancel(conversation_id, request_id)
        extra = _checked_headers(headers)
        producer = await self._started_producer()
        await producer.send_and_wait(
            self.topics.requests,
            cancel.encode(),
            key=conversation_id.encode(),
            headers=[*contract_headers(CANCEL_SCHEMA), *extra],
        )

    async def _started_producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            await self.require_topics(self.topics.requests)
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap_servers,
                enable_idempotence=True,
                acks="all",
                **self.kafka_options,
            )
            await producer.start()
            self._producer = producer
        return self._producer

    # --- metadata ---------------------------------------------------------------------------

    async def partitions(self, topic: str) -> int:
        """How many partitions ``topic`` has, waiting up to ``topic_wait_s`` for it to appear
        (a worker that is starting creates its topics); ``TopicMissingError`` otherwise. Asks
        for all topics' metadata, which never creates one."""
        if self._metadata is None:
            raise ClientError("the client is not started: use `async with ChatClient(...)`")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.topic_wait_s
        while True:
            cluster = await self._metadata.fetch_all_metadata()
            found = cluster.partitions_for_topic(topic)
            if found:
                self._known_topics.add(topic)
                return len(found)
            if loop.time() >= deadline:
                raise TopicMissingError(f"topic {topic!r} does not exist")
            await asyncio.sleep(0.2)

    async def require_topics(self, *topics: str) -> None:
        """Return once every one of ``topics`` exists; ``TopicMissingError`` naming the first
        that does not."""
        for topic in topics:
            if topic not in self._known_topics:
                await self.partitions(topic)

    # --- consuming --------------------------------------------------------------------------

    def follow(
        self,
        *,
        conversation_id: str | None = None,
        request_id: str | None = None,
        start: Start = "end",
        since_ms: int | None = None,
        folder: StreamFolder | None = None,
        consumer_options: Mapping[str, Any] | None = None,
    ) -> Follower:
        """A follower of one conversation (only its partitions are read), one request, or all.

        It starts at the topics' end, their beginning, or the first record at or after
        ``since_ms`` (Kafka timestamps, milliseconds). Use it as
        ``async with client.follow(...) as events: async for event in events``: once inside,
        the start positions are fixed, so nothing produced afterwards is missed.
        """
        if conversation_id is not None and not isinstance(conversation_id, str):
            raise InvalidRequestError("conversation_id must be a str")
        if request_id is not None and not isinstance(request_id, str):
            raise InvalidRequestError("request_id must be a str")
        if start not in ("end", "beginning"):
            raise ValueError(f"start must be 'end' or 'beginning', not {start!r}")
        return Follower(
            self,
            conversation_id=conversation_id,
            request_id=request_id,
            start=start,
            since_ms=since_ms,
            folder=folder or StreamFolder(),
            consumer_options=dict(consumer_options or {}),
        )

    async def ask(
        self,
        conversation_id: str,
        input: ChatInput | list[dict[str, Any]],
        *,
        on_event: Callable[[FollowEvent], object] | None = None,
        timeout_s: float = 120.0,
        request_id: str | None = None,
        assistant_id: str | None = None,
        assistant_overrides: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        reset_context: bool = False,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> ChatResponse:
        """Send one turn and return its final response; ``on_event`` gets its deltas, restarts
        and response as they arrive. ``AskTimeoutError`` after ``timeout_s`` without a final
        response (the request may still run; follow its ``request_id`` to see it end)."""
        request = new_request(
            conversation_id,
            input,
            request_id=request_id,
            assistant_id=assistant_id,
            assistant_overrides=assistant_overrides,
            metadata=metadata,
            reset_context=reset_context,
        )
        async with self.follow(
            conversation_id=conversation_id, request_id=request.request_id
        ) as events:
            await self.send_request(request, headers=headers)
            try:
                async with asyncio.timeout(timeout_s):
                    async for event in events:
                        if on_event is not None:
                            on_event(event)
                        if isinstance(event, Response):
                            return event.response
            except TimeoutError:
                raise AskTimeoutError(
                    f"no final response to request {request.request_id!r} within {timeout_s:g} s",
                    request_id=request.request_id,
                ) from None
        raise AssertionError("a follower ends only when it is closed")  # pragma: no cover


class Follower:
    """Reads the delta and response topics and yields folded events (``ChatClient.follow``).

    A record that is not the contract is yielded as ``Unreadable`` when it can be attributed:
    following everything, or following the conversation its key names. Following one request,
    such a record names no request and is left out.
    """

    def __init__(
        self,
        client: ChatClient,
        *,
        conversation_id: str | None,
        request_id: str | None,
        start: Start,
        since_ms: int | None,
        folder: StreamFolder,
        consumer_options: dict[str, Any],
    ) -> None:
        self._client = client
        self.conversation_id = conversation_id
        self.request_id = request_id
        self._start = start
        self._since_ms = since_ms
        self._folder = folder
        self._consumer_options = consumer_options
        self._consumer: AIOKafkaConsumer | None = None
        self._delta_partitions: list[TopicPartition] = []
        self._pending: deque[FollowEvent] = deque()

    async def __aenter__(self) -> Self:
        client = self._client
        topics = client.topics
        consumer = AIOKafkaConsumer(
            bootstrap_servers=client.bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            **{**client.kafka_options, **self._consumer_options},
        )
        await consumer.start()
        self._consumer = consumer
        try:
            deltas = await self._partitions(topics.deltas)
            responses = await self._partitions(topics.responses)
            self._delta_partitions = deltas
            await self._assign([*deltas, *responses])
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> FollowEvent:
        while not self._pending:
            self._pending.extend(await self.poll())
        return self._pending.popleft()

    async def poll(self, timeout_ms: int = POLL_MS) -> list[FollowEvent]:
        """The events of the records read within ``timeout_ms`` (possibly none): for loops that
        do something else between polls."""
        consumer = self._started()
        deltas_topic = self._client.topics.deltas
        batch = await consumer.getmany(timeout_ms=timeout_ms)
        events: list[FollowEvent] = []
        for tp in sorted(batch, key=lambda tp: tp.topic != deltas_topic):
            for record in batch[tp]:
                if tp.topic == deltas_topic:
                    events += self._fold_delta(record)
                else:
                    events += await self._fold_response(record)
        return events

    def _started(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise ClientError("the follower is not started: use `async with client.follow(...)`")
        return self._consumer

    async def _partitions(self, topic: str) -> list[TopicPartition]:
        count = await self._client.partitions(topic)
        if self.conversation_id is None:
            return [TopicPartition(topic, p) for p in range(count)]
        return [TopicPartition(topic, partition_for(self.conversation_id, count))]

    async def _assign(self, partitions: list[TopicPartition]) -> None:
        consumer = self._started()
        consumer.assign(partitions)
        if self._since_ms is not None:
            found = await consumer.offsets_for_times(dict.fromkeys(partitions, self._since_ms))
            ends = await consumer.end_offsets(partitions)
            for tp in partitions:
                at = found.get(tp)
                consumer.seek(tp, at.offset if at is not None else ends[tp])
        elif self._start == "beginning":
            await consumer.seek_to_beginning(*partitions)
        else:
            await consumer.seek_to_end(*partitions)
        for tp in partitions:
            await consumer.position(tp)  # resolves the position now, not at the first fetch

    def _wants(self, conversation_id: str, request_id: str) -> bool:
        if self.conversation_id is not None and conversation_id != self.conversation_id:
            return False
        return self.request_id is None or request_id == self.request_id

    def _wants_unreadable(self, record: ConsumerRecord[bytes, bytes]) -> bool:
        if self.request_id is not None:
            return False
        return self.conversation_id is None or record.key == self.conversation_id.encode()

    def _fold_delta(self, record: ConsumerRecord[bytes, bytes]) -> list[FollowEvent]:
        try:
            delta = ChatDelta.model_validate_json(record.value or b"")
        except ValidationError as exc:
            return self._unreadable(record, exc)
        if not self._wants(delta.conversation_id, delta.request_id):
            return []
        return list(self._folder.on_delta(delta))

    async def _fold_response(self, record: ConsumerRecord[bytes, bytes]) -> list[FollowEvent]:
        try:
            response = ChatResponse.model_validate_json(record.value or b"")
        except ValidationError as exc:
            return self._unreadable(record, exc)
        if not self._wants(response.conversation_id, response.request_id):
            return []
        events = await self._catch_up_deltas()
        folded: list[Event] = self._folder.on_response(response)
        return [*events, *folded]

    async def _catch_up_deltas(self) -> list[FollowEvent]:
        """The events of the deltas published before now, up to the delta topics' end."""
        consumer = self._started()
        partitions = self._delta_partitions
        ends = await consumer.end_offsets(partitions)
        events: list[FollowEvent] = []
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            batch = await consumer.getmany(*partitions, timeout_ms=POLL_MS)
            for records in batch.values():
                for record in records:
                    events += self._fold_delta(record)
        return events

    def _unreadable(
        self, record: ConsumerRecord[bytes, bytes], exc: ValidationError
    ) -> list[FollowEvent]:
        if not self._wants_unreadable(record):
            return []
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        reason = f"{where}: {first['msg']}" if where else first["msg"]
        return [Unreadable(record.topic, record.partition, record.offset, record.key, reason)]
