"""The Vapi simulator as a real HTTP server on 127.0.0.1, driven with httpx, byte for byte."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from worker.simulator.events import DONE_EVENT, delta_event
from worker.simulator.faults import FaultRule
from worker.simulator.replies import split_tokens
from worker.simulator.server import RunningSimulator, SimulatorConfig, serve_simulator
from worker.simulator.streaming import FLAT_OUT_WRITE_BYTES, ReplyStream

pytestmark = pytest.mark.component

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ROOT = Path(__file__).resolve().parents[2]
#: One TLS context for every client: building one per client costs ~0.1 s (CA loading), and
#: these clients only speak plain HTTP to 127.0.0.1 anyway.
TLS = ssl.create_default_context()


def sim_client(base_url: str, **options: Any) -> httpx.AsyncClient:
    """An authorised client for a simulator at ``base_url``."""
    return httpx.AsyncClient(base_url=base_url, headers=AUTH, verify=TLS, **options)


def fast_config(**overrides: Any) -> SimulatorConfig:
    """A quick simulator: 5-token replies, 10 ms to the first delta, 1 ms between deltas."""
    settings: dict[str, Any] = {
        "api_key": KEY,
        "first_token_latency_s": 0.01,
        "inter_token_delay_s": 0.001,
        "reply_tokens": 5,
    }
    return SimulatorConfig(**{**settings, **overrides})


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    """A fast simulator on an ephemeral port."""
    async with serve_simulator(fast_config()) as running:
        yield running


@pytest.fixture
async def client(sim: RunningSimulator) -> AsyncIterator[httpx.AsyncClient]:
    """An authorised client for ``sim``."""
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with sim_client(sim.base_url, timeout=10, limits=limits) as http:
        yield http


def chat_body(text: Any, **fields: Any) -> dict[str, Any]:
    """A streaming chat request for assistant ``a1``."""
    return {"assistantId": "a1", "input": text, "stream": True, **fields}


async def stream_raw(
    client: httpx.AsyncClient, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[httpx.Response, bytes]:
    """POST /chat and read the whole raw body."""
    async with client.stream("POST", "/chat", json=body, headers=headers) as response:
        raw = b"".join([chunk async for chunk in response.aiter_raw()])
    return response, raw


def events(raw: bytes) -> list[dict[str, Any]]:
    """The JSON payloads of the ``data:`` events in a raw SSE body."""
    blocks = [block for block in raw.split(b"\n\n") if block]
    return [json.loads(block.removeprefix(b"data: ")) for block in blocks]


def reply_of(raw: bytes) -> str:
    """The concatenated deltas of a raw SSE body."""
    return "".join(event["delta"] for event in events(raw))


async def test_healthz(client: httpx.AsyncClient) -> None:
    """``/healthz`` answers 200 without auth."""
    response = await client.get("/healthz", headers={"Authorization": ""})
    assert response.status_code == 200


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", KEY, "Basic dGVzdA=="])
async def test_bad_or_missing_key_is_401(sim: RunningSimulator, authorization: str | None) -> None:
    """Without ``Bearer <api_key>`` the answer is Vapi's 401 JSON error."""
    headers = {} if authorization is None else {"Authorization": authorization}
    async with httpx.AsyncClient(base_url=sim.base_url, verify=TLS) as anonymous:
        response = await anonymous.post("/chat", json=chat_body("hi"), headers=headers)
    assert response.status_code == 401
    body = response.json()
    assert body["error"] == "Unauthorized"
    assert body["statusCode"] == 401
    assert isinstance(body["message"], str)
    assert sim.state.calls[-1].status == 401


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"assistantId": "a1", "stream": True}, "input should not be null"),
        ({"assistantId": "a1", "input": []}, "non-empty array"),
        ({"input": "hi"}, "one of assistantId"),
        ({"assistantId": "a1", "input": "x", "sessionId": "s", "previousChatId": "c"}, "exclusive"),
        ({"assistantId": "a1", "input": "x", "name": "n" * 41}, "40 characters"),
        ({"assistantId": "a1", "input": "x", "temperature": 1}, "should not exist"),
        ({"assistantId": "a1", "input": "x", "stream": "true"}, "boolean"),
        ({"assistantId": "a1", "input": "x [[sim:fault explode]]"}, "unknown fault kind"),
    ],
)
async def test_invalid_requests_are_400(
    client: httpx.AsyncClient, body: dict[str, Any], fragment: str
) -> None:
    """Bodies breaking ``CreateChatDTO`` (or with a bad directive) get a 400 naming the problem."""
    response = await client.post("/chat", json=body)
    assert response.status_code == 400
    payload = response.json()
    assert payload["error"] == "Bad Request"
    assert any(fragment in line for line in payload["message"]), payload


async def test_body_that_is_not_json_is_400(client: httpx.AsyncClient) -> None:
    """A body that does not parse as JSON is a 400."""
    response = await client.post(
        "/chat", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400


async def test_stream_bytes_are_exactly_vapis_framing(client: httpx.AsyncClient) -> None:
    """Each delta is ``data: <compact JSON>`` + blank line, and the server then closes the body."""
    response, raw = await stream_raw(client, chat_body("héllo wörld"))
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    chat_id = events(raw)[0]["id"]
    tokens = ["Reply ", "to: ", "héllo ", "wörld ", "w5"]
    assert raw == b"".join(delta_event(chat_id, token) for token in tokens)
    assert raw.startswith(
        b'data: {"id":"'
        + chat_id.encode()
        + b'","path":"chat.output[0].content","delta":"Reply "}\n\n'
    )


def record_writes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every write a reply stream makes, in order."""
    writes: list[bytes] = []
    original = ReplyStream._write

    async def recording(self: ReplyStream, data: bytes) -> None:
        writes.append(data)
        await original(self, data)

    monkeypatch.setattr(ReplyStream, "_write", recording)
    return writes


async def test_flat_out_deltas_share_writes_with_the_same_bytes(
    client: httpx.AsyncClient, sim: RunningSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no delay, events due together go out in writes of about FLAT_OUT_WRITE_BYTES."""
    writes = record_writes(monkeypatch)
    body = chat_body("x [[sim:pace first_ms=0 delay_ms=0 tokens=300]]")
    _, raw = await stream_raw(client, body)
    chat_id = events(raw)[0]["id"]
    tokens = split_tokens(sim.state.chats[chat_id].output[0]["content"])
    assert len(tokens) == 300
    assert raw == b"".join(delta_event(chat_id, token) for token in tokens)
    assert b"".join(writes) == raw
    # Split at event boundaries; each write but the last is the first one to reach the size.
    assert all(write.endswith(b"\n\n") for write in writes)
    longest_event = max(len(delta_event(chat_id, token)) for token in tokens)
    assert all(
        FLAT_OUT_WRITE_BYTES <= len(write) < FLAT_OUT_WRITE_BYTES + longest_event
        for write in writes[:-1]
    )
    assert 1 < len(writes) <= len(raw) // FLAT_OUT_WRITE_BYTES + 1
    assert sim.state.calls[-1].deltas_sent == 300


async def test_paced_deltas_are_written_one_by_one(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a delay between tokens every event is its own write, when it is due."""
    writes = record_writes(monkeypatch)
    _, raw = await stream_raw(client, chat_body("x [[sim:pace delay_ms=1 tokens=8]]"))
    assert writes == [event + b"\n\n" for event in raw.split(b"\n\n") if event]


async def test_faults_land_at_their_position_in_a_flat_out_stream(
    client: httpx.AsyncClient, sim: RunningSimulator
) -> None:
    """A flat-out stream is cut before a fault: ``disconnect after=150`` sends exactly 150."""
    pace, fault = (
        "[[sim:pace first_ms=0 delay_ms=0 tokens=300]]",
        "[[sim:fault disconnect after=150]]",
    )
    received = bytearray()

    async def read() -> None:
        async with client.stream("POST", "/chat", json=chat_body(f"x {pace} {fault}")) as response:
            async for chunk in response.aiter_raw():
                received.extend(chunk)

    with pytest.raises(httpx.RemoteProtocolError):
        await read()
    assert len(events(bytes(received))) == 150
    assert sim.state.calls[-1].deltas_sent == 150


async def test_deltas_concatenate_to_the_stored_reply(
    client: httpx.AsyncClient, sim: RunningSimulator
) -> None:
    """The deltas join into exactly the reply the chat stores, and the call record counts them."""
    _, raw = await stream_raw(client, chat_body("count these words please [[sim:pace tokens=12]]"))
    chat_id = events(raw)[0]["id"]
    stored = sim.state.chats[chat_id].output[0]["content"]
    assert reply_of(raw) == stored
    assert len(split_tokens(reply_of(raw))) == 12
    assert stored == "Reply to: count these words please w7 w8 w9 w10 w11 w12"
    assert sim.state.calls[-1].deltas_sent == 12


async def test_bulk_tokens_stream_as_huge_events_in_vapis_framing(
    client: httpx.AsyncClient, sim: RunningSimulator
) -> None:
    """``token_chars`` makes each delta one huge event, UTF-8 unescaped, framed as any other."""
    token = "\u20ac" * 299_999 + " "
    body = chat_body("x [[sim:pace first_ms=0 delay_ms=0 tokens=2 token_chars=300000 char=\u20ac]]")
    _, raw = await stream_raw(client, body)
    chat_id = events(raw)[0]["id"]
    assert raw == delta_event(chat_id, token) * 2
    assert len(raw) > 2 * 3 * 299_999  # three UTF-8 bytes a character, no \u escapes
    assert sim.state.chats[chat_id].output[0]["content"] == token * 2
    assert sim.state.calls[-1].deltas_sent == 2


async def test_done_marker_ends_the_stream_when_configured() -> None:
    """With ``done_marker`` the last event is ``data: [DONE]``."""
    async with (
        serve_simulator(fast_config(done_marker=True)) as running,
        sim_client(running.base_url) as http,
    ):
        _, raw = await stream_raw(http, chat_body("hi"))
    assert raw.endswith(b"\n\n" + DONE_EVENT)
    assert raw.count(b"data: ") == 6


async def test_non_streaming_returns_a_chat_object(client: httpx.AsyncClient) -> None:
    """Without ``stream`` the answer is one ``Chat`` JSON object with the reply in ``output``."""
    response = await client.post("/chat", json={"assistantId": "a1", "input": "hi there"})
    assert response.status_code == 200
    chat = response.json()
    assert chat["id"].startswith("chat_")
    assert chat["assistantId"] == "a1"
    assert chat["output"] == [{"role": "assistant", "content": "Reply to: hi there w5"}]
    assert chat["messages"] == [{"role": "user", "content": "hi there"}]
    assert {"orgId", "createdAt", "updatedAt", "cost"} <= chat.keys()


async def test_previous_chat_id_carries_the_conversation(client: httpx.AsyncClient) -> None:
    """A name told in one chat is known in the chat that continues it by ``previousChatId``."""
    _, first = await stream_raw(client, chat_body("Hi, my name is Alice"))
    assert reply_of(first) == "Nice to meet you, Alice! I will remember your name."
    previous = events(first)[0]["id"]
    _, second = await stream_raw(client, chat_body("What's my name?", previousChatId=previous))
    assert reply_of(second) == "Your name is Alice."
    _, fresh = await stream_raw(client, chat_body("What's my name?"))
    assert reply_of(fresh) == "I don't know your name yet."


async def test_message_array_input_is_accepted(client: httpx.AsyncClient) -> None:
    """``input`` may be a list of messages; the user's words drive the reply."""
    messages = [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "my name is Ann"},
    ]
    _, raw = await stream_raw(client, chat_body(messages))
    assert reply_of(raw) == "Nice to meet you, Ann! I will remember your name."


async def test_unknown_previous_chat_id_is_404(client: httpx.AsyncClient) -> None:
    """A ``previousChatId`` the simulator never issued is a 404, as a stale id would be."""
    response = await client.post("/chat", json=chat_body("hi", previousChatId="chat_gone"))
    assert response.status_code == 404
    assert response.json()["statusCode"] == 404


async def test_previous_chat_of_another_assistant_is_400(client: httpx.AsyncClient) -> None:
    """Continuing a chat with a different assistant is refused with a 400."""
    _, first = await stream_raw(client, chat_body("hello"))
    body = {**chat_body("again", previousChatId=events(first)[0]["id"]), "assistantId": "a2"}
    response = await client.post("/chat", json=body)
    assert response.status_code == 400


async def test_session_keeps_memory(client: httpx.AsyncClient) -> None:
    """A ``sessionId`` is created on first use and remembers earlier turns; events carry it."""
    _, first = await stream_raw(client, chat_body("my name is Sam", sessionId="sess-1"))
    assert events(first)[0]["sessionId"] == "sess-1"
    _, second = await stream_raw(client, chat_body("what is my name", sessionId="sess-1"))
    assert reply_of(second) == "Your name is Sam."
    response = await client.post(
        "/chat", json={**chat_body("x", sessionId="sess-1"), "assistantId": "other"}
    )
    assert response.status_code == 400


async def test_status_fault_429_with_retry_after(client: httpx.AsyncClient) -> None:
    """``status code=429 retry_after=7`` answers 429, Vapi's JSON error and ``Retry-After: 7``."""
    response = await client.post(
        "/chat", json=chat_body("x [[sim:fault status code=429 retry_after=7]]")
    )
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert response.json()["error"] == "Too Many Requests"


async def test_status_fault_with_http_date_retry_after(client: httpx.AsyncClient) -> None:
    """``retry_after_in=S`` sends an HTTP-date S seconds ahead."""
    response = await client.post(
        "/chat", json=chat_body("x [[sim:fault status code=503 retry_after_in=30]]")
    )
    assert response.status_code == 503
    ahead = parsedate_to_datetime(response.headers["retry-after"]).timestamp() - time.time()
    assert 25 < ahead <= 31


async def test_rawstatus_fault_sends_a_status_outside_http(
    client: httpx.AsyncClient, sim: RunningSimulator
) -> None:
    """``rawstatus code=999`` answers a bare ``HTTP/1.1 999`` line, as a broken proxy might."""
    response = await client.post("/chat", json=chat_body("x [[sim:fault rawstatus code=999]]"))
    assert response.status_code == 999
    call = sim.state.calls[-1]
    assert (call.fault, call.status, call.outcome, call.chat_id) == (
        "rawstatus",
        999,
        "fault",
        None,
    )


async def test_reset_fault_is_a_connection_error(
    client: httpx.AsyncClient, sim: RunningSimulator
) -> None:
    """``reset`` drops the connection before any response, so the client sees a transport error."""
    with pytest.raises(httpx.TransportError):
        await client.post("/chat", json=chat_body("x [[sim:fault reset]]"))
    call = sim.state.calls[-1]
    assert (call.fault, call.status, call.chat_id) == ("reset", None, None)


async def test_disconnect_fault_leaves_the_stream_incomplete(
    client: httpx.AsyncClient, sim: RunningSimulator
) -> None:
    """``disconnect after=2`` delivers two deltas, then the body breaks off unterminated."""
    received = bytearray()

    async def read() -> None:
        body = chat_body("x [[sim:fault disconnect after=2]]")
        async with client.stream("POST", "/chat", json=body) as response:
            async for chunk in response.aiter_raw():
                received.extend(chunk)

    with pytest.raises(httpx.RemoteProtocolError):
        await read()
    assert [e["delta"] for e in events(bytes(received))] == ["Reply ", "to: "]
    chat_id = events(bytes(received))[0]["id"]
    assert chat_id not in sim.state.chats  # a broken chat cannot be continued
    assert sim.state.calls[-1].deltas_sent == 2


async def test_stall_fault_pauses_between_deltas(client: httpx.AsyncClient) -> None:
    """``stall after=2 seconds=0.4`` holds the third delta back by at least 0.4 s."""
    body = chat_body("x [[sim:pace first_ms=0 delay_ms=0]] [[sim:fault stall after=2 seconds=0.4]]")
    arrivals: list[float] = []
    buffer = b""
    async with client.stream("POST", "/chat", json=body) as response:
        async for chunk in response.aiter_raw():
            buffer += chunk
            arrivals += [time.monotonic()] * (buffer.count(b"\n\n") - len(arrivals))
    assert len(arrivals) == 5
    assert arrivals[2] - arrivals[1] >= 0.35
    assert reply_of(buffer) == "Reply to: x w4 w5"


@pytest.mark.parametrize(
    ("line", "expected"),
    [("json", b"data: {not json\n\n"), ("nofield", b'{"id":"'), ("utf8", b'"delta":"\xff\xfe"}')],
)
async def test_malformed_fault_inserts_a_bad_line_and_continues(
    client: httpx.AsyncClient, line: str, expected: bytes
) -> None:
    """``malformed after=1`` puts one bad line after the first delta; all deltas still follow."""
    _, raw = await stream_raw(client, chat_body(f"x [[sim:fault malformed after=1 line={line}]]"))
    blocks = raw.split(b"\n\n")
    assert expected in blocks[1] + b"\n\n"
    good = b"\n\n".join(blocks[:1] + blocks[2:])
    assert reply_of(good) == "Reply to: x w4 w5"


async def test_times_limits_a_fault_per_request_id(
    client: httpx.AsyncClient, sim: RunningSimulator
) -> None:
    """``times=2`` fails the first two calls of a request id, then lets it through."""
    body = chat_body("x [[sim:fault status code=503 times=2]]")

    async def status(request_id: str, attempt: int) -> int:
        headers = {"X-Request-Id": request_id, "X-Attempt": str(attempt)}
        response, _ = await stream_raw(client, body, headers)
        return response.status_code

    assert [await status("r-1", n) for n in (1, 2, 3, 4)] == [503, 503, 200, 200]
    assert await status("r-2", 1) == 503
    assert [c.fault for c in sim.state.calls] == ["status", "status", None, None, "status"]


async def test_times_falls_back_to_the_input_without_request_id(client: httpx.AsyncClient) -> None:
    """Without ``X-Request-Id``, calls with the same input share the ``times`` count."""
    body = chat_body("same [[sim:fault status code=500 times=1]]")
    first, _ = await stream_raw(client, body)
    second, _ = await stream_raw(client, body)
    assert (first.status_code, second.status_code) == (500, 200)


async def test_runtime_fault_rules_match_assistant_and_can_be_removed(
    client: httpx.AsyncClient,
) -> None:
    """Rules added by ``POST /_sim/faults`` hit their assistant only, until deleted."""
    added = await client.post("/_sim/faults", json={"rule": "assistant=a-bad:status code=502"})
    assert added.status_code == 200
    assert added.json()[0]["match_assistant_id"] == "a-bad"
    bad = {**chat_body("hi"), "assistantId": "a-bad"}
    assert (await client.post("/chat", json=bad)).status_code == 502
    assert (await stream_raw(client, chat_body("hi")))[0].status_code == 200
    await client.delete("/_sim/faults")
    assert (await client.get("/_sim/faults")).json() == []
    assert (await client.post("/chat", json=bad)).status_code == 200
    rejected = await client.post("/_sim/faults", json={"kind": "explode"})
    assert rejected.status_code == 400


async def test_configured_fault_rules_apply_from_the_start() -> None:
    """Rules in ``SimulatorConfig.faults`` are active as soon as the server runs."""
    rule = FaultRule("status", {"code": "429", "retry_after": "1"}, match_input_contains="slow")
    async with (
        serve_simulator(fast_config(faults=[rule])) as running,
        sim_client(running.base_url) as http,
    ):
        limited = await http.post("/chat", json=chat_body("go slow"))
        normal = await http.post("/chat", json=chat_body("go fast"))
    assert (limited.status_code, limited.headers["retry-after"], normal.status_code) == (
        429,
        "1",
        200,
    )


async def test_calls_endpoint_records_each_call(client: httpx.AsyncClient) -> None:
    """``/_sim/calls`` lists request id, attempt, ids, input, status, fault and counts per call."""
    headers = {"X-Request-Id": "req-9", "X-Attempt": "3"}
    _, raw = await stream_raw(client, chat_body("hello"), headers)
    await client.post("/chat", json=chat_body("x", previousChatId="chat_nope"))
    calls = (await client.get("/_sim/calls", headers={})).json()
    first, second = calls
    assert first["request_id"] == "req-9"
    assert first["attempt"] == 3
    assert first["assistant_id"] == "a1"
    assert first["input"] == "hello"
    assert first["chat_id"] == events(raw)[0]["id"]
    assert (first["status"], first["fault"], first["deltas_sent"]) == (200, None, 5)
    assert first["started_at"] <= first["ended_at"]
    assert (second["request_id"], second["attempt"], second["previous_chat_id"]) == (
        None,
        None,
        "chat_nope",
    )
    assert (second["status"], second["chat_id"]) == (404, None)
    assert (await client.delete("/_sim/calls")).status_code == 200
    assert (await client.get("/_sim/calls")).json() == []


async def test_stats_and_reset(client: httpx.AsyncClient) -> None:
    """``/_sim/stats`` counts calls; ``/_sim/stats/reset`` zeroes them."""
    await stream_raw(client, chat_body("a"))
    await stream_raw(client, chat_body("b"))
    stats = (await client.get("/_sim/stats")).json()
    assert stats == {
        "calls": 2,
        "streams_in_flight": 0,
        "peak_streams_in_flight": 1,
        "over_limit": 0,
    }
    reset = (await client.post("/_sim/stats/reset")).json()
    assert reset == {
        "calls": 0,
        "streams_in_flight": 0,
        "peak_streams_in_flight": 0,
        "over_limit": 0,
    }


async def test_delta_times_are_recorded_when_asked() -> None:
    """With ``record_delta_times`` every delta's write time is kept per chat, in order."""
    async with (
        serve_simulator(fast_config(record_delta_times=True)) as running,
        sim_client(running.base_url) as http,
    ):
        before = time.time()
        _, raw = await stream_raw(http, chat_body("hi"))
        times = (await http.get("/_sim/delta-times")).json()
    stamps = times[events(raw)[0]["id"]]
    assert len(stamps) == 5
    assert stamps == sorted(stamps)
    assert before <= stamps[0]


async def test_client_going_away_ends_the_stream(
    client: httpx.AsyncClient, sim: RunningSimulator
) -> None:
    """When the client closes mid-stream the server stops and the in-flight count drops."""
    body = chat_body("x [[sim:pace first_ms=0 delay_ms=200 tokens=50]]")
    async with client.stream("POST", "/chat", json=body) as response:
        async for _ in response.aiter_raw():
            break
        assert sim.state.stats.streams_in_flight == 1
    for _ in range(100):
        if sim.state.stats.streams_in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert sim.state.stats.streams_in_flight == 0
    assert sim.state.calls[-1].outcome == "client_closed"


async def test_hundred_concurrent_streams(client: httpx.AsyncClient, sim: RunningSimulator) -> None:
    """100 streams run at once and all complete; the peak in flight reaches 100."""
    body = chat_body("x [[sim:pace first_ms=1000 delay_ms=1 tokens=4]]")
    results = await asyncio.gather(*(stream_raw(client, body) for _ in range(100)))
    assert all(reply_of(raw) == "Reply to: x w4" for _, raw in results)
    assert len({events(raw)[0]["id"] for _, raw in results}) == 100
    stats = (await client.get("/_sim/stats")).json()
    assert stats["peak_streams_in_flight"] == 100
    assert stats["streams_in_flight"] == 0


async def test_organisation_limit_answers_429_with_retry_after_over_it() -> None:
    """With ``max_chats`` the call over the limit gets Vapi's 429 body and a Retry-After; the
    limit counts calls being answered, so one slot frees when a stream ends."""
    config = fast_config(max_chats=2, max_chats_retry_after_s=1.5)
    slow = chat_body("x [[sim:pace first_ms=300 delay_ms=1 tokens=2]]")
    async with serve_simulator(config) as running, sim_client(running.base_url) as http:
        first = asyncio.create_task(stream_raw(http, slow))
        second = asyncio.create_task(stream_raw(http, slow))
        await asyncio.sleep(0.1)
        refused = await http.post("/chat", json=chat_body("third"))
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == "1.5"
        assert refused.json()["statusCode"] == 429
        await asyncio.gather(first, second)
        fourth, _ = await stream_raw(http, chat_body("fourth"))
        stats = (await http.get("/_sim/stats")).json()
    assert fourth.status_code == 200
    assert (stats["over_limit"], stats["peak_streams_in_flight"]) == (1, 2)
    assert [call.outcome for call in running.state.calls].count("over_limit") == 1


def test_cli_serves_until_sigterm(tmp_path: Path) -> None:
    """``python -m worker.simulator --port 0`` prints its URL, serves, and exits 0 on SIGTERM."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "worker.simulator", "--port", "0", "--api-key", KEY]
    with subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            assert line.startswith("simulator listening on http://127.0.0.1:")
            base_url = line.removeprefix("simulator listening on ")
            assert httpx.get(f"{base_url}/healthz", timeout=5, verify=TLS).status_code == 200
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
