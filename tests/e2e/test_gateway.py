"""``vapi-worker gateway`` over HTTP against the real broker, worker and simulator: tokens on
every call, a turn's events as SSE, resuming from any event id, and one consumer per partition."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from tests.e2e.gateway_process import GatewayProcess, SseMessage, sse_messages, worker_and_gateway
from tests.e2e.harness import SimulatorProcess, Topics, WorkerProcess, read_topic
from tests.kafka_fixture import create_topics
from vapi_stream_client import partition_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

PARTITIONS = 4


SIM_ARGS = ("--first-token-latency-s", "0.05", "--inter-token-delay-s", "0.02")


@pytest.fixture
async def stack(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, tmp_path: Path
) -> AsyncIterator[tuple[WorkerProcess, GatewayProcess]]:
    async with worker_and_gateway(
        kafka_bootstrap, topics, simulator, tmp_path, PARTITIONS
    ) as running:
        yield running


def _events_url(gateway: GatewayProcess, conversation: str) -> str:
    return f"{gateway.base_url}/v1/conversations/{conversation}/events"


def _messages_url(gateway: GatewayProcess, conversation: str) -> str:
    return f"{gateway.base_url}/v1/conversations/{conversation}/messages"


async def _post(
    http: aiohttp.ClientSession, gateway: GatewayProcess, conversation: str, text: str
) -> str:
    async with http.post(
        _messages_url(gateway, conversation),
        json={"input": text},
        headers={"Authorization": f"Bearer {gateway.token(conversation)}"},
    ) as reply:
        body = await reply.json()
        assert reply.status == 202, body
        request_id: str = body["request_id"]
        return request_id


async def _read_until_response(
    http: aiohttp.ClientSession,
    gateway: GatewayProcess,
    conversation: str,
    request_id: str | None = None,
    last_event_id: str | None = None,
    on_ready: asyncio.Event | None = None,
) -> list[SseMessage]:
    """The stream's events up to the final response of ``request_id`` (any, when None)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events: list[SseMessage] = []
    async with http.get(
        _events_url(gateway, conversation),
        params={"token": gateway.token(conversation)},
        headers=headers,
    ) as stream:
        assert stream.status == 200, await stream.text()
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        async with asyncio.timeout(60):
            async for message in sse_messages(stream):
                events.append(message)
                if message.event == "ready" and on_ready is not None:
                    on_ready.set()
                if message.event == "response" and (
                    request_id is None or message.json()["request_id"] == request_id
                ):
                    return events
    raise AssertionError(f"the stream ended before a response: {events}")


async def test_every_call_needs_the_conversations_own_token(
    stack: tuple[WorkerProcess, GatewayProcess], kafka_bootstrap: str, topics: Topics
) -> None:
    """No token is 401, another conversation's token or a malformed header 403/401, on both
    routes and as a query parameter; refused calls produce nothing."""
    _, gateway = stack
    own, other = gateway.token("conv-a"), gateway.token("conv-b")
    async with aiohttp.ClientSession() as http:
        for method, url in (
            ("POST", _messages_url(gateway, "conv-a")),
            ("GET", _events_url(gateway, "conv-a")),
        ):
            cases: list[tuple[dict[str, str], dict[str, str], int]] = [
                ({}, {}, 401),
                ({"Authorization": f"Bearer {other}"}, {}, 403),
                ({}, {"token": other}, 403),
                ({}, {"token": own + "x"}, 403),
                ({"Authorization": f"Basic {own}"}, {}, 401),
                ({"Authorization": "Bearer "}, {}, 401),
            ]
            for headers, params, status in cases:
                async with http.request(
                    method, url, headers=headers, params=params, json={"input": "hi"}
                ) as reply:
                    assert reply.status == status, (method, headers, params)
                    assert (await reply.json())["error"] in {"unauthorized", "forbidden"}
        auth = {"Authorization": f"Bearer {own}"}
        for body, code in (
            ("not json", "bad_request"),
            ({"text": "hi"}, "bad_request"),
            ({"input": "hi", "assistant_id": "x"}, "bad_request"),
            ({"input": 5}, "invalid_request"),
            ({"input": [{"role": "user"}]}, "invalid_request"),
            ({"input": "x" * 32_001}, "input_too_large"),
        ):
            kwargs = {"data": body} if isinstance(body, str) else {"json": body}
            async with http.post(_messages_url(gateway, "conv-a"), headers=auth, **kwargs) as reply:
                assert reply.status == 400, body
                assert (await reply.json())["error"] == code, body
        long_id = "c" * 300
        async with http.post(
            _messages_url(gateway, long_id),
            json={"input": "hi"},
            headers={"Authorization": f"Bearer {gateway.token(long_id)}"},
        ) as reply:
            assert reply.status == 400
            assert "conversation_id" in (await reply.json())["message"]
        async with http.get(
            _events_url(gateway, "conv-a"), params={"token": own}, headers={"Last-Event-ID": "9"}
        ) as reply:
            assert reply.status == 400
            assert (await reply.json())["error"] == "bad_event_id"
    assert await read_topic(kafka_bootstrap, topics.requests, timeout_s=3) == []


async def test_a_turn_streams_and_every_event_id_resumes_exactly(
    stack: tuple[WorkerProcess, GatewayProcess],
) -> None:
    """Two turns (the second answered from memory, the first broken after 3 deltas and
    restarted): the deltas after the last restart make the final text; reconnecting with any
    event's id as Last-Event-ID gives exactly the events after it, ids and data alike."""
    _, gateway = stack
    conversation = "conv-resume"
    async with aiohttp.ClientSession() as http:
        ready = asyncio.Event()
        reading = asyncio.create_task(
            _read_until_response(http, gateway, conversation, on_ready=ready)
        )
        await ready.wait()
        first = await _post(
            http,
            gateway,
            conversation,
            "My name is Ada. [[sim:fault disconnect after=3 times=1]]",
        )
        events = await reading
        assert events[0].event == "ready"
        names = [e.event for e in events[1:]]
        assert "restart" in names, names
        final = events[-1].json()
        assert final["request_id"] == first
        assert final["status"] == "completed"
        after_restart = names.index("restart") + 2
        shown = "".join(e.json()["delta"] for e in events[after_restart:] if e.event == "delta")
        assert shown == final["text"] == "Nice to meet you, Ada! I will remember your name."

        ready = asyncio.Event()
        reading = asyncio.create_task(
            _read_until_response(
                http, gateway, conversation, last_event_id=events[-1].id, on_ready=ready
            )
        )
        await ready.wait()
        second = await _post(http, gateway, conversation, "What is my name?")
        more = await reading
        assert more[0].id == events[-1].id  # the stream starts where the last one ended
        assert more[-1].json() | {"request_id": second} == more[-1].json()
        assert more[-1].json()["text"] == "Your name is Ada."
        whole = events + more[1:]
        partial_ids = [e.id for e in whole if e.id and e.id.count("-") == 2]
        assert partial_ids, "a restart and its delta come from one record: a half-sent id"
        ids = [e.id for e in whole]
        assert len(set(ids[1:])) == len(ids) - 1, "every event has its own id"
        for index, message in enumerate(whole[:-1]):
            rest = [e for e in whole[index + 1 :] if e.event != "ready"]
            resumed = await _read_until_response(
                http, gateway, conversation, second, last_event_id=message.id
            )
            assert resumed[0].event == "ready"
            assert resumed[1:] == rest, f"resuming from {message.id}"


async def test_browsers_share_one_consumer_per_partition(
    stack: tuple[WorkerProcess, GatewayProcess],
) -> None:
    """Twelve streams of conversations on two partitions make two feeds, and each stream gets
    only its own conversation's events."""
    _, gateway = stack
    by_partition: dict[int, list[str]] = {}
    for n in range(200):
        key = f"share-{n}"
        by_partition.setdefault(partition_for(key, PARTITIONS), []).append(key)
    conversations = by_partition[0][:6] + by_partition[1][:6]
    async with aiohttp.ClientSession() as http:
        readies = [asyncio.Event() for _ in conversations]
        readers = [
            asyncio.create_task(_read_until_response(http, gateway, c, on_ready=ready))
            for c, ready in zip(conversations, readies, strict=True)
        ]
        await asyncio.gather(*(ready.wait() for ready in readies))
        assert gateway.health()["feeds"] == 2
        sent = await asyncio.gather(*(_post(http, gateway, c, f"hi {c}") for c in conversations))
        streams = await asyncio.gather(*readers)
    for conversation, request_id, events in zip(conversations, sent, streams, strict=True):
        payloads = [e.json() for e in events[1:]]
        assert {p["conversation_id"] for p in payloads} == {conversation}
        assert {p["request_id"] for p in payloads} == {request_id}
        text = "".join(p["delta"] for p in payloads if "delta" in p)
        assert text == payloads[-1]["text"]
    assert gateway.health()["feeds"] == 2


async def test_demo_mode_issues_tokens_on_127_0_0_1_only(
    kafka_bootstrap: str, topics: Topics, tmp_path: Path
) -> None:
    """``GATEWAY_DEMO=true``: ``/`` redirects to a new conversation with a token that the API
    accepts; bound to another address, the gateway refuses to start."""
    await create_topics(
        kafka_bootstrap, [topics.requests, topics.deltas, topics.responses], PARTITIONS
    )
    gateway = GatewayProcess(
        kafka_bootstrap, topics, tmp_path, GATEWAY_DEMO="true", GATEWAY_SECRET=""
    ).start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{gateway.base_url}/", allow_redirects=False) as reply:
                assert reply.status == 302
                location = URL(reply.headers["Location"])
            conversation, token = location.query["conversation"], location.query["token"]
            async with http.post(
                _messages_url(gateway, conversation),
                json={"input": "hi"},
                headers={"Authorization": f"Bearer {token}"},
            ) as reply:
                assert reply.status == 202
            async with http.get(f"{gateway.base_url}{location}") as page:
                assert page.status == 200
                assert "EventSource" in await page.text()
    finally:
        gateway.stop()
    public = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "gateway",
        env={**gateway.env, "GATEWAY_HOST": "0.0.0.0"},
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(public.communicate(), 60)
    assert public.returncode == 2
    assert "GATEWAY_HOST=127.0.0.1" in stderr.decode()
