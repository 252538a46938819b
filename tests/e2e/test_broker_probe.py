"""The /readyz broker probe against a real broker, and against one that stalls mid-request."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import struct
import warnings
from types import TracebackType

import pytest

from worker.config import Settings
from worker.topics import BrokerProbe

pytestmark = pytest.mark.e2e


class StallingProxy:
    """A TCP proxy to the real broker that forwards the first ``pass_responses`` Kafka responses
    of each connection and then holds every later one back: a broker that accepts a client and
    answers its handshake, then stops answering (as an overloaded or half-partitioned one does).

    ``open_connections`` counts client connections the client side has not closed yet.
    """

    def __init__(self, bootstrap: str, pass_responses: int) -> None:
        host, _, port = bootstrap.split(",")[0].rpartition(":")
        self._target = (host or "127.0.0.1", int(port))
        self._pass = pass_responses
        self.open_connections = 0
        self.none_open = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> StallingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.close()
        for writer in self._writers:
            writer.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.open_connections += 1
        self.none_open.clear()
        broker_r, broker_w = await asyncio.open_connection(*self._target)
        self._writers += [client_w, broker_w]
        responses = asyncio.create_task(self._forward_responses(broker_r, client_w))
        self._tasks.add(responses)
        try:
            while chunk := await client_r.read(65536):
                broker_w.write(chunk)
                await broker_w.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.open_connections -= 1  # the client closed its side (EOF or reset)
            if not self.open_connections:
                self.none_open.set()
            responses.cancel()
            broker_w.close()
            client_w.close()

    async def _forward_responses(
        self, broker_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            for _ in range(self._pass):
                header = await broker_r.readexactly(4)
                body = await broker_r.readexactly(struct.unpack(">i", header)[0])
                client_w.write(header + body)
                await client_w.drain()
            await asyncio.Event().wait()  # later responses are never delivered


async def _wait_for_no_open_connections(proxy: StallingProxy, timeout_s: float) -> None:
    if proxy.open_connections:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proxy.none_open.wait(), timeout_s)


async def test_the_probe_answers_true_against_the_real_broker(kafka_bootstrap: str) -> None:
    """A reachable broker makes the probe report reachable (so a False below means something)."""
    probe = BrokerProbe(Settings(kafka_bootstrap_servers=kafka_bootstrap), timeout_s=10)
    try:
        assert await probe.check() is True
        assert probe.reachable is True
    finally:
        await probe.close()


async def test_a_check_that_times_out_while_starting_closes_its_connection(
    kafka_bootstrap: str,
) -> None:
    """The broker answers the client's handshake, then never its metadata request: each check
    times out while its admin client starts, reports unreachable, and closes that client and its
    connection itself. Checks repeat every 10 s during an outage, so a connection left for the
    garbage collector to find (aiokafka warns "Unclosed AIOKafkaConnection") is one leak per
    check."""
    async with StallingProxy(kafka_bootstrap, pass_responses=1) as proxy:
        probe = BrokerProbe(Settings(kafka_bootstrap_servers=proxy.address), timeout_s=0.5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            try:
                for _ in range(3):
                    assert await probe.check() is False
                    assert probe.reachable is False
                await _wait_for_no_open_connections(proxy, timeout_s=5)
            finally:
                await probe.close()
            gc.collect()
        unclosed = [str(w.message) for w in caught if "AIOKafkaConnection" in str(w.message)]
        assert unclosed == []
        assert proxy.open_connections == 0
