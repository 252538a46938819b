"""VapiClient against the real Vapi simulator on 127.0.0.1: replies, errors, deadlines, cancel."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from aiohttp import web
from pydantic import SecretStr

from worker.errors import (
    ConfigError,
    VapiAuthError,
    VapiConnectError,
    VapiError,
    VapiProtocolError,
    VapiRateLimitedError,
    VapiStatusError,
    VapiStreamBrokenError,
    VapiTimeoutError,
)
from worker.simulator.server import RunningSimulator, SimulatorConfig, serve_simulator
from worker.vapi.client import VapiClient, VapiTimeouts
from worker.vapi.events import StreamDelta

pytestmark = pytest.mark.component

KEY = "sk-test-8f14e45fceea167a"
ROOMY = VapiTimeouts(connect_s=2, first_delta_s=5, stall_s=5, request_s=10)


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    """A simulator with no artificial latency on an ephemeral port."""
    config = SimulatorConfig(api_key=KEY, first_token_latency_s=0, inter_token_delay_s=0)
    async with serve_simulator(config, port=0) as running:
        yield running


@pytest.fixture
def malformed() -> list[str]:
    """Reasons passed to the client's on_malformed callback."""
    return []


@pytest.fixture
async def vapi(sim: RunningSimulator, malformed: list[str]) -> AsyncIterator[VapiClient]:
    """A client for the simulator with roomy deadlines."""
    async with VapiClient(sim.base_url, SecretStr(KEY), ROOMY, on_malformed=malformed.append) as c:
        yield c


def _body(text: str, **extra: object) -> dict[str, object]:
    return {"assistantId": "sim-assistant", "input": text, "stream": True, **extra}


async def _collect(
    client: VapiClient,
    text: str,
    *,
    request_id: str = "req-1",
    attempt: int = 1,
    on_delta: Callable[[StreamDelta], Any] | None = None,
    **extra: object,
) -> tuple[list[StreamDelta], VapiError | None]:
    """Every delta of one call, and the error that ended it (None when it completed)."""
    deltas: list[StreamDelta] = []
    stream = client.stream_chat(_body(text, **extra), request_id=request_id, attempt=attempt)
    try:
        async with contextlib.aclosing(stream):
            async for delta in stream:
                deltas.append(delta)
                if on_delta is not None:
                    await on_delta(delta)
    except VapiError as exc:
        return deltas, exc
    return deltas, None


async def _sim_get(sim: RunningSimulator, path: str) -> Any:
    async with httpx.AsyncClient(base_url=sim.base_url) as http:
        response = await http.get(path)
        response.raise_for_status()
        return response.json()


async def _wait_for_no_streams(sim: RunningSimulator, within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while (await _sim_get(sim, "/_sim/stats"))["streams_in_flight"] != 0:
        assert time.monotonic() < deadline, "the simulator still has a stream open"
        await asyncio.sleep(0.02)


# --- replies ---------------------------------------------------------------------------------


async def test_happy_path_deltas_make_the_reply(vapi: VapiClient, sim: RunningSimulator) -> None:
    """The deltas concatenate to the simulator's reply and carry its chat id."""
    deltas, error = await _collect(vapi, "hello there")
    assert error is None
    [call] = await _sim_get(sim, "/_sim/calls")
    chat = sim.state.chats[call["chat_id"]]
    assert "".join(d.delta for d in deltas) == chat.output[0]["content"]
    assert len(deltas) == call["deltas_sent"] > 1
    assert {d.chat_id for d in deltas} == {call["chat_id"]}
    assert {d.path for d in deltas} == {"chat.output[0].content"}


async def test_request_headers_reach_vapi(vapi: VapiClient, sim: RunningSimulator) -> None:
    """X-Request-Id and X-Attempt are sent and recorded by the simulator."""
    await _collect(vapi, "hi", request_id="req-xyz", attempt=3)
    [call] = await _sim_get(sim, "/_sim/calls")
    assert (call["request_id"], call["attempt"]) == ("req-xyz", 3)


async def test_previous_chat_id_continues_a_chat(vapi: VapiClient, sim: RunningSimulator) -> None:
    """The body is sent as given: a previousChatId from turn 1 continues that chat in turn 2."""
    first, _ = await _collect(vapi, "turn one")
    second, error = await _collect(vapi, "turn two", previousChatId=first[0].chat_id)
    assert error is None
    calls = await _sim_get(sim, "/_sim/calls")
    assert calls[1]["previous_chat_id"] == first[0].chat_id
    assert second[0].chat_id != first[0].chat_id


async def test_empty_reply_is_not_an_error(vapi: VapiClient) -> None:
    """A stream that ends without any delta is a valid, empty reply."""
    assert await _collect(vapi, "[[sim:pace tokens=0]] hi") == ([], None)


async def test_done_marker_ends_the_stream() -> None:
    """With data: [DONE] before the close, the reply is still complete and the call ends."""
    config = SimulatorConfig(
        api_key=KEY, first_token_latency_s=0, inter_token_delay_s=0, done_marker=True
    )
    async with (
        serve_simulator(config, port=0) as sim,
        VapiClient(sim.base_url, SecretStr(KEY), ROOMY) as vapi,
    ):
        deltas, error = await _collect(vapi, "hello")
        assert error is None
        [call] = await _sim_get(sim, "/_sim/calls")
        assert (
            "".join(d.delta for d in deltas)
            == sim.state.chats[call["chat_id"]].output[0]["content"]
        )


async def test_many_streams_at_once(vapi: VapiClient, sim: RunningSimulator) -> None:
    """Forty concurrent calls on one client all complete with their own replies."""
    results = await asyncio.gather(
        *(_collect(vapi, f"[[sim:pace delay_ms=5]] q{i}", request_id=f"r{i}") for i in range(40))
    )
    assert all(error is None and deltas for deltas, error in results)
    assert len({deltas[0].chat_id for deltas, _ in results}) == 40
    stats = await _sim_get(sim, "/_sim/stats")
    assert stats["peak_streams_in_flight"] > 1


async def test_the_pool_bounds_the_connections_to_vapi(sim: RunningSimulator) -> None:
    """With ``max_connections=2``, six calls at once all complete, never more than two at a
    time: the others wait for a pooled connection."""
    async with VapiClient(sim.base_url, SecretStr(KEY), ROOMY, max_connections=2) as vapi:
        results = await asyncio.gather(
            *(
                _collect(vapi, f"[[sim:pace tokens=4 delay_ms=50]] q{i}", request_id=f"r{i}")
                for i in range(6)
            )
        )
    assert all(error is None and len(deltas) == 4 for deltas, error in results), results
    stats = await _sim_get(sim, "/_sim/stats")
    assert stats["calls"] == 6
    assert stats["peak_streams_in_flight"] == 2


# --- HTTP errors -----------------------------------------------------------------------------


async def test_wrong_key_is_an_auth_error(sim: RunningSimulator) -> None:
    """A 401 is VapiAuthError, not retryable, and the wrong key appears nowhere in it."""
    async with VapiClient(sim.base_url, SecretStr("sk-wrong-key"), ROOMY) as vapi:
        _, error = await _collect(vapi, "hi")
    assert isinstance(error, VapiAuthError)
    assert (error.http_status, error.retryable) == (401, False)
    assert "sk-wrong-key" not in f"{error} {error!r} {error.body}"


async def test_forbidden_is_an_auth_error(vapi: VapiClient) -> None:
    """A 403 is VapiAuthError too."""
    _, error = await _collect(vapi, "[[sim:fault status code=403]] hi")
    assert isinstance(error, VapiAuthError)
    assert error.http_status == 403


async def test_rate_limit_carries_retry_after_seconds(vapi: VapiClient) -> None:
    """A 429 is a retryable VapiRateLimitedError with Retry-After in seconds."""
    _, error = await _collect(vapi, "[[sim:fault status code=429 retry_after=1]] hi")
    assert isinstance(error, VapiRateLimitedError)
    assert (error.http_status, error.retryable, error.retry_after_s) == (429, True, 1.0)


async def test_rate_limit_with_an_http_date(vapi: VapiClient) -> None:
    """A Retry-After given as an HTTP-date becomes the seconds until that date."""
    _, error = await _collect(vapi, "[[sim:fault status code=429 retry_after_in=30]] hi")
    assert isinstance(error, VapiRateLimitedError)
    assert error.retry_after_s is not None
    assert 28 <= error.retry_after_s <= 31


async def test_rate_limit_without_retry_after(vapi: VapiClient) -> None:
    """A 429 without Retry-After has retry_after_s None."""
    _, error = await _collect(vapi, "[[sim:fault status code=429]] hi")
    assert isinstance(error, VapiRateLimitedError)
    assert error.retry_after_s is None


async def test_server_error_is_retryable(vapi: VapiClient) -> None:
    """A 500 is a retryable VapiStatusError quoting the body's message."""
    _, error = await _collect(vapi, "[[sim:fault status code=500 message='db down']] hi")
    assert type(error) is VapiStatusError
    assert (error.http_status, error.retryable) == (500, True)
    assert "db down" in str(error)


async def test_bad_request_is_final_and_joins_messages(vapi: VapiClient) -> None:
    """A 400 with Vapi's list of messages is not retryable and quotes them."""
    _, error = await _collect(vapi, "hi", input=None)
    assert type(error) is VapiStatusError
    assert (error.http_status, error.retryable) == (400, False)
    assert "input" in str(error)


async def test_api_key_echoed_by_the_server_is_scrubbed(vapi: VapiClient) -> None:
    """If Vapi's error text contains the API key, the exception does not."""
    _, error = await _collect(vapi, f"[[sim:fault status code=400 message='bad key {KEY}']] hi")
    assert isinstance(error, VapiStatusError)
    assert KEY not in f"{error} {error!r} {error.body}"
    assert "bad key **********" in str(error)


async def test_every_other_secret_echoed_by_the_server_is_scrubbed(sim: RunningSimulator) -> None:
    """The worker's other secrets (a Kafka password) are scrubbed from Vapi's text as well."""
    others = [SecretStr("sasl-pw-0451"), SecretStr("")]
    async with VapiClient(sim.base_url, SecretStr(KEY), ROOMY, scrub=others) as vapi:
        _, error = await _collect(
            vapi, "[[sim:fault status code=400 message='pw sasl-pw-0451']] hi"
        )
    assert isinstance(error, VapiStatusError)
    assert "sasl-pw-0451" not in f"{error} {error!r} {error.body}"
    assert "pw **********" in str(error)


async def test_non_sse_answer_is_a_protocol_error(vapi: VapiClient) -> None:
    """A 200 that is not text/event-stream (here: stream false) is VapiProtocolError."""
    _, error = await _collect(vapi, "hi", stream=False)
    assert isinstance(error, VapiProtocolError)
    assert "application/json" in str(error)
    assert not error.retryable


@pytest.mark.parametrize("code", [999, 600])
async def test_a_status_outside_http_is_a_protocol_error(vapi: VapiClient, code: int) -> None:
    """A status line outside 100-599 (a broken proxy) is VapiProtocolError, not retried."""
    deltas, error = await _collect(vapi, f"[[sim:fault rawstatus code={code}]] hi")
    assert deltas == []
    assert isinstance(error, VapiProtocolError)
    assert (error.http_status, error.retryable) == (None, False)
    assert str(code) in str(error)


async def test_an_unreadable_status_line_is_a_connect_error(vapi: VapiClient) -> None:
    """A status line aiohttp cannot read at all (``HTTP/1.1 0``) is no response: retryable."""
    deltas, error = await _collect(vapi, "[[sim:fault rawstatus code=0]] hi")
    assert deltas == []
    assert isinstance(error, VapiConnectError)
    assert error.retryable


# --- broken connections ----------------------------------------------------------------------


async def test_reset_before_response_is_a_connect_error(vapi: VapiClient) -> None:
    """A connection reset before any response byte is a retryable VapiConnectError."""
    deltas, error = await _collect(vapi, "[[sim:fault reset]] hi")
    assert deltas == []
    assert isinstance(error, VapiConnectError)
    assert error.retryable


async def test_refused_connection_is_a_connect_error() -> None:
    """Nothing listening on the port is VapiConnectError."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with VapiClient(f"http://127.0.0.1:{port}", SecretStr(KEY), ROOMY) as vapi:
        _, error = await _collect(vapi, "hi")
    assert isinstance(error, VapiConnectError)


async def test_a_connect_that_gets_no_answer_is_a_connect_timeout() -> None:
    """A listener whose accept queue is full drops the SYN: past ``connect_s`` that is
    VapiTimeoutError(phase=connect), through the real transport."""
    timeouts = dataclasses.replace(ROOMY, connect_s=0.3)
    with contextlib.ExitStack() as sockets:
        server = sockets.enter_context(socket.socket())
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        for _ in range(3):  # fill the accept queue; nothing is ever accepted
            filler = sockets.enter_context(socket.socket())
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        async with VapiClient(f"http://127.0.0.1:{port}", SecretStr(KEY), timeouts) as vapi:
            _, error = await _collect(vapi, "hi")
    assert isinstance(error, VapiTimeoutError), error
    assert error.phase == "connect"


async def test_disconnect_mid_stream_is_a_broken_stream(vapi: VapiClient) -> None:
    """A connection dropped after 3 deltas yields those 3, then VapiStreamBrokenError."""
    deltas, error = await _collect(vapi, "[[sim:fault disconnect after=3]] hi")
    assert len(deltas) == 3
    assert isinstance(error, VapiStreamBrokenError)
    assert error.retryable


async def test_malformed_line_is_skipped_and_counted(
    vapi: VapiClient, sim: RunningSimulator, malformed: list[str]
) -> None:
    """A line that is not JSON is skipped, counted and reported; the reply is still whole."""
    deltas, error = await _collect(vapi, "[[sim:fault malformed after=1]] hi")
    assert error is None
    [call] = await _sim_get(sim, "/_sim/calls")
    assert "".join(d.delta for d in deltas) == sim.state.chats[call["chat_id"]].output[0]["content"]
    assert malformed == ["not_json"]
    assert vapi.malformed_events == 1


async def test_event_without_delta_is_skipped_and_counted(
    vapi: VapiClient, malformed: list[str]
) -> None:
    """Valid JSON without a delta is counted as malformed with its own reason."""
    _, error = await _collect(vapi, "[[sim:fault malformed after=2 line=nodelta]] hi")
    assert error is None
    assert malformed == ["missing_delta"]


async def test_invalid_utf8_is_a_protocol_error(vapi: VapiClient) -> None:
    """Bytes that are not UTF-8 end the call with VapiProtocolError, after the good deltas."""
    deltas, error = await _collect(vapi, "[[sim:fault malformed after=2 line=utf8]] hi")
    assert len(deltas) == 2
    assert isinstance(error, VapiProtocolError)


# --- deadlines -------------------------------------------------------------------------------


_ROOMY_S = {"connect_s": 2.0, "first_delta_s": 5.0, "stall_s": 5.0, "request_s": 10.0}


def _client(sim: RunningSimulator, **timeouts: float) -> VapiClient:
    return VapiClient(sim.base_url, SecretStr(KEY), VapiTimeouts(**{**_ROOMY_S, **timeouts}))


async def test_stall_between_deltas_times_out(sim: RunningSimulator) -> None:
    """No delta for longer than stall_s after the second one is VapiTimeoutError(phase=stall)."""
    async with _client(sim, stall_s=0.5) as vapi:
        started = time.monotonic()
        deltas, error = await _collect(vapi, "[[sim:fault stall after=2 seconds=5]] hi")
    assert len(deltas) == 2
    assert isinstance(error, VapiTimeoutError)
    assert error.phase == "stall"
    assert time.monotonic() - started < 4
    await _wait_for_no_streams(sim)


async def test_slow_first_delta_times_out(sim: RunningSimulator) -> None:
    """No delta within first_delta_s of the call is VapiTimeoutError(phase=first_delta)."""
    async with _client(sim, first_delta_s=0.3) as vapi:
        deltas, error = await _collect(vapi, "[[sim:pace first_ms=5000]] hi")
    assert deltas == []
    assert isinstance(error, VapiTimeoutError)
    assert error.phase == "first_delta"


async def test_whole_request_deadline(sim: RunningSimulator) -> None:
    """A steady stream that outlasts request_s is VapiTimeoutError(phase=request)."""
    async with _client(sim, request_s=0.8) as vapi:
        deltas, error = await _collect(vapi, "[[sim:pace tokens=100 delay_ms=50]] hi")
    assert 0 < len(deltas) < 100
    assert isinstance(error, VapiTimeoutError)
    assert error.phase == "request"


async def test_slow_consumer_is_not_a_stall(sim: RunningSimulator) -> None:
    """Time the consumer spends on a delta does not count towards the stall deadline."""

    async def slow(_: StreamDelta) -> None:
        await asyncio.sleep(0.8)

    async with _client(sim, stall_s=0.5) as vapi:
        deltas, error = await _collect(vapi, "[[sim:pace tokens=2]] hi", on_delta=slow)
    assert error is None
    assert len(deltas) == 2


async def test_request_deadline_never_cancels_the_consumer(sim: RunningSimulator) -> None:
    """A request deadline passing while the consumer works is raised when it asks for more."""
    finished: list[bool] = []

    async def slow(_: StreamDelta) -> None:
        await asyncio.sleep(1.5)
        finished.append(True)

    async with _client(sim, request_s=1.0) as vapi:
        deltas, error = await _collect(vapi, "[[sim:pace tokens=5]] hi", on_delta=slow)
    assert len(deltas) == 1
    assert finished == [True]
    assert isinstance(error, VapiTimeoutError)
    assert error.phase == "request"


# --- cancellation ----------------------------------------------------------------------------


async def test_cancelling_a_waiting_consumer_closes_the_stream(
    vapi: VapiClient, sim: RunningSimulator
) -> None:
    """Cancelling the task while it waits for a delta closes the connection at once."""
    seen: list[StreamDelta] = []
    two = asyncio.Event()

    async def count(delta: StreamDelta) -> None:
        seen.append(delta)
        if len(seen) == 2:
            two.set()

    task = asyncio.create_task(
        _collect(vapi, "[[sim:pace tokens=50 delay_ms=200]] hi", on_delta=count)
    )
    await asyncio.wait_for(two.wait(), timeout=5)
    assert (await _sim_get(sim, "/_sim/stats"))["streams_in_flight"] == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _wait_for_no_streams(sim)
    [call] = await _sim_get(sim, "/_sim/calls")
    assert call["outcome"] == "client_closed"


async def test_cancelling_a_busy_consumer_closes_the_stream(
    vapi: VapiClient, sim: RunningSimulator
) -> None:
    """Cancelling the task while it handles a delta closes the stream through aclosing."""
    busy = asyncio.Event()

    async def block(_: StreamDelta) -> None:
        busy.set()
        await asyncio.sleep(3600)

    task = asyncio.create_task(
        _collect(vapi, "[[sim:pace tokens=50 delay_ms=100]] hi", on_delta=block)
    )
    await asyncio.wait_for(busy.wait(), timeout=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _wait_for_no_streams(sim)


async def test_outer_timeout_is_not_mistaken_for_a_vapi_timeout(
    vapi: VapiClient, sim: RunningSimulator
) -> None:
    """A caller's own asyncio.timeout surfaces as TimeoutError, not VapiTimeoutError."""
    with pytest.raises(TimeoutError) as caught:
        async with asyncio.timeout(0.3):
            await _collect(vapi, "[[sim:pace tokens=50 delay_ms=100]] hi")
    assert not isinstance(caught.value, VapiError)
    await _wait_for_no_streams(sim)


async def test_client_survives_a_failed_call(vapi: VapiClient) -> None:
    """After a broken stream the same client serves the next call normally."""
    await _collect(vapi, "[[sim:fault disconnect after=1]] hi")
    deltas, error = await _collect(vapi, "hi again")
    assert error is None
    assert deltas


# --- construction (no network) ---------------------------------------------------------------


@pytest.mark.unit
def test_repr_does_not_show_the_key() -> None:
    """Neither the client's repr nor its timeouts reveal the API key."""
    client = VapiClient("http://127.0.0.1:1", SecretStr(KEY), ROOMY)
    assert KEY not in repr(client)
    assert KEY not in repr(vars(client))


@pytest.mark.unit
@pytest.mark.parametrize("url", ["ftp://vapi", "api.vapi.ai", "http://"])
def test_base_url_must_be_http(url: str) -> None:
    """A base URL that is not http(s)://host is a ConfigError at construction."""
    with pytest.raises(ConfigError):
        VapiClient(url, SecretStr(KEY), ROOMY)


@pytest.mark.unit
@pytest.mark.parametrize("field", ["connect_s", "first_delta_s", "stall_s", "request_s"])
def test_timeouts_must_be_positive(field: str) -> None:
    """Zero, negative or infinite timeouts are refused."""
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ConfigError):
            VapiTimeouts(**{**_ROOMY_S, field: bad})


@pytest.mark.unit
async def test_connect_timeout_maps_to_the_connect_phase() -> None:
    """httpx's connect timeout becomes VapiTimeoutError(phase=connect) (a mapping-only check)."""

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectTimeout("timed out", request=request)

    async with VapiClient(
        "http://vapi.test", SecretStr(KEY), ROOMY, transport=httpx.MockTransport(refuse)
    ) as vapi:
        _, error = await _collect(vapi, "hi")
    assert isinstance(error, VapiTimeoutError)
    assert error.phase == "connect"


# --- GET /chat/{id} --------------------------------------------------------------------------


async def test_fetch_chat_returns_the_chat_the_stream_made(vapi: VapiClient) -> None:
    """The fetched chat is the streamed one: same id, the whole reply, its cost."""
    deltas, error = await _collect(vapi, "hello there")
    assert error is None
    chat = await vapi.fetch_chat(deltas[0].chat_id, request_id="req-1", timeout_s=5)
    assert isinstance(chat, dict)
    assert chat["id"] == deltas[0].chat_id
    assert chat["output"][0]["content"] == "".join(d.delta for d in deltas)
    assert chat["cost"] > 0


async def test_fetch_chat_maps_statuses_to_vapi_errors(vapi: VapiClient) -> None:
    """An unknown chat is a 404 status error; a fetch fault's 503 too; a wrong key is auth."""
    with pytest.raises(VapiStatusError) as missing:
        await vapi.fetch_chat("chat_missing", request_id="r", timeout_s=5)
    assert missing.value.http_status == 404
    deltas, _ = await _collect(vapi, "hi [[sim:fault fetch code=503]]")
    with pytest.raises(VapiStatusError) as unavailable:
        await vapi.fetch_chat(deltas[0].chat_id, request_id="r", timeout_s=5)
    assert unavailable.value.http_status == 503


async def test_fetch_chat_with_a_wrong_key_is_an_auth_error(sim: RunningSimulator) -> None:
    async with VapiClient(sim.base_url, SecretStr("wrong"), ROOMY) as wrong:
        with pytest.raises(VapiAuthError):
            await wrong.fetch_chat("chat_x", request_id="r", timeout_s=5)


async def test_fetch_chat_is_bounded_by_its_timeout() -> None:
    """A server that accepts and never answers: VapiTimeoutError(phase="fetch") on time."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        async with VapiClient(f"http://127.0.0.1:{port}", SecretStr(KEY), ROOMY) as silent:
            started = time.monotonic()
            with pytest.raises(VapiTimeoutError) as timeout:
                await silent.fetch_chat("chat_x", request_id="r", timeout_s=0.3)
            assert timeout.value.phase == "fetch"
            assert time.monotonic() - started < 3


async def test_fetch_chat_refuses_a_body_that_is_not_a_json_object() -> None:
    """A 200 whose body is not a JSON object is a protocol error, not a crash."""
    app = web.Application()

    async def not_json(_: web.Request) -> web.Response:
        return web.Response(text="[1, 2]", content_type="application/json")

    app.router.add_get("/chat/{id}", not_json)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with VapiClient(f"http://127.0.0.1:{port}", SecretStr(KEY), ROOMY) as odd:
            with pytest.raises(VapiProtocolError):
                await odd.fetch_chat("chat_x", request_id="r", timeout_s=5)
    finally:
        await runner.cleanup()
