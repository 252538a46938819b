"""``python -m bench.gateway`` (``make bench-gateway``): many browsers' event streams on one
gateway process.

A local broker (or ``--bootstrap``), the output topics (``--partitions``; the delta topic with
``message.timestamp.type=LogAppendTime``, so a record's timestamp is when it reached the broker)
and one ``vapi-worker gateway`` process. ``--streams`` event streams are opened on it, one per
conversation, by this process (aiohttp, as ``EventSource`` would). Then deltas are produced
straight to the delta topic, ``--rate`` per second for ``--seconds``, spread over the
conversations (no worker: the gateway's cost is what is measured). Each delta's latency is from
its broker timestamp to the moment its stream delivered it here. Every delta must arrive exactly
once at its conversation's stream, or the run fails.

Reported: p50/p99/max latency, the gateway's CPU (share of one core over the load) and RSS (with
the streams open and idle, and at peak), and how many feeds (consumers) it ran. The clients and
the producer run in this process on the same machine, so the figures are contended ones.
Written to ``.run/bench-gateway-<time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import aiohttp
import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.procs import RUN_DIR, LocalBroker, ServiceProcess, free_port
from vapi_stream_client import ChatDelta
from worker.gateway.tokens import issue_token

SECRET = "bench-gateway-secret-0123456789"


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__)
    parser.add_argument("--streams", type=int, default=1000, help="event streams (conversations)")
    parser.add_argument("--rate", type=float, default=1000.0, help="deltas per second, in all")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long deltas are produced")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--bootstrap", help="an existing broker (default: start a local one)")
    return parser.parse_args(argv)


async def _create_topics(bootstrap: str, run: str, partitions: int) -> dict[str, str]:
    topics = {"deltas": f"bench-gw-deltas-{run}", "responses": f"bench-gw-responses-{run}"}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(
                    topics["deltas"],
                    partitions,
                    1,
                    topic_configs={"message.timestamp.type": "LogAppendTime"},
                ),
                NewTopic(topics["responses"], partitions, 1),
            ]
        )
    finally:
        await admin.close()
    return {**topics, "requests": f"bench-gw-requests-{run}"}


class Streams:
    """The browsers: one event stream per conversation, each delta's arrival time kept."""

    def __init__(self, base_url: str, conversations: list[str]) -> None:
        self.base_url = base_url
        self.conversations = conversations
        self.arrivals: dict[tuple[str, int], list[float]] = defaultdict(list)
        self.count = 0
        self.expected = 0
        self.all_arrived = asyncio.Event()
        self.ready = 0
        self.all_ready = asyncio.Event()
        self.errors: list[str] = []

    async def run(self, http: aiohttp.ClientSession) -> None:
        await asyncio.gather(*(self._one(http, c) for c in self.conversations))

    async def _one(self, http: aiohttp.ClientSession, conversation: str) -> None:
        url = f"{self.base_url}/v1/conversations/{conversation}/events"
        try:
            async with http.get(url, params={"token": issue_token(SECRET, conversation)}) as r:
                if r.status != 200:
                    self.errors.append(f"{conversation}: {r.status}")
                    return
                event = ""
                async for raw in r.content:
                    line = raw.rstrip(b"\r\n")
                    if line.startswith(b"event: "):
                        event = line[7:].decode()
                    elif line.startswith(b"data: ") and event == "delta":
                        now = time.time()
                        body = json.loads(line[6:])
                        self.arrivals[(body["request_id"], body["seq"])].append(now)
                        self.count += 1
                        if self.count >= self.expected > 0:
                            self.all_arrived.set()
                    elif line.startswith(b"data: ") and event == "ready":
                        self.ready += 1
                        if self.ready == len(self.conversations):
                            self.all_ready.set()
        except (aiohttp.ClientError, asyncio.CancelledError) as exc:
            if not isinstance(exc, asyncio.CancelledError):
                self.errors.append(f"{conversation}: {exc!r}")


async def _produce(
    bootstrap: str, topic: str, conversations: list[str], rate: float, seconds: float
) -> list[tuple[str, int]]:
    """Deltas at ``rate`` per second, round robin over the conversations; their keys."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=1, acks=1)
    await producer.start()
    sent: list[tuple[str, int]] = []
    try:
        total = int(rate * seconds)
        started = time.monotonic()
        for n in range(total):
            conversation = conversations[n % len(conversations)]
            seq = n // len(conversations)
            request_id = f"req-{conversation}"
            delta = ChatDelta(
                request_id=request_id,
                conversation_id=conversation,
                chat_id="bench-chat",
                attempt=1,
                seq=seq,
                delta=f"w{seq} ",
                ts=time.time(),
            )
            await producer.send(topic, delta.encode(), key=conversation.encode())
            sent.append((request_id, seq))
            ahead = started + (n + 1) / rate - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)
        await producer.flush()
    finally:
        await producer.stop()
    return sent


async def _broker_times(bootstrap: str, topic: str, partitions: int, count: int) -> dict[Any, int]:
    """Each delta's broker timestamp (LogAppendTime, ms) by (request_id, seq)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    times: dict[Any, int] = {}
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        async with asyncio.timeout(120):
            while len(times) < count:
                batch = await consumer.getmany(timeout_ms=500, max_records=10_000)
                for records in batch.values():
                    for record in records:
                        body = json.loads(record.value)
                        times[(body["request_id"], body["seq"])] = record.timestamp
    finally:
        await consumer.stop()
    return times


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def _run(args: argparse.Namespace, bootstrap: str) -> dict[str, Any]:
    run = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    topics = await _create_topics(bootstrap, run, args.partitions)
    port = free_port()
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "TOPIC_REQUESTS": topics["requests"],
        "TOPIC_DELTAS": topics["deltas"],
        "TOPIC_RESPONSES": topics["responses"],
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(port),
        "GATEWAY_SECRET": SECRET,
        "LOG_FORMAT": "json",
    }
    RUN_DIR.mkdir(exist_ok=True)
    gateway = ServiceProcess(
        [sys.executable, "-m", "worker", "gateway"],
        env,
        RUN_DIR / f"bench-gateway-{run}.log",
        "gateway",
    ).start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        async with asyncio.timeout(60):
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    async with httpx.AsyncClient() as probe:
                        if (await probe.get(f"{base_url}/healthz")).status_code == 200:
                            break
                if gateway.exited() is not None:
                    raise RuntimeError(f"the gateway exited:\n{gateway.log_tail()}")
                await asyncio.sleep(0.2)
        assert gateway.sampler is not None
        rss_before = gateway.sampler.samples[-1].rss
        conversations = [f"conv-{n}" for n in range(args.streams)]
        streams = Streams(base_url, conversations)
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            reading = asyncio.create_task(streams.run(http))
            async with asyncio.timeout(120):
                await streams.all_ready.wait()
            await asyncio.sleep(2)
            rss_open = gateway.sampler.samples[-1].rss
            async with httpx.AsyncClient() as probe:
                feeds = (await probe.get(f"{base_url}/healthz")).json()["feeds"]
            load_start = time.time()
            sent = await _produce(
                bootstrap, topics["deltas"], conversations, args.rate, args.seconds
            )
            load_end = time.time()
            streams.expected = len(sent)
            if streams.count >= streams.expected:
                streams.all_arrived.set()
            with contextlib.suppress(TimeoutError):  # what is missing is reported below
                async with asyncio.timeout(60):
                    await streams.all_arrived.wait()
            await asyncio.sleep(1)
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
        broker = await _broker_times(bootstrap, topics["deltas"], args.partitions, len(sent))
    finally:
        gateway.stop(30)
    missing = [k for k in sent if not streams.arrivals.get(k)]
    twice = [k for k, v in streams.arrivals.items() if len(v) > 1]
    latencies = [
        (streams.arrivals[k][0] - broker[k] / 1000) * 1000 for k in sent if streams.arrivals.get(k)
    ]
    assert gateway.sampler is not None
    cpu_s = gateway.sampler.cpu_between(load_start, load_end)
    return {
        "run": run,
        "streams": args.streams,
        "partitions": args.partitions,
        "feeds": feeds,
        "deltas": len(sent),
        "rate_per_s": args.rate,
        "seconds": round(load_end - load_start, 1),
        "missing": len(missing),
        "delivered_twice": len(twice),
        "stream_errors": streams.errors[:10],
        "latency_ms": {
            "p50": round(statistics.median(latencies), 1),
            "p99": round(_percentile(latencies, 0.99), 1),
            "max": round(max(latencies), 1),
        },
        "gateway_cpu_share_of_one_core": round(cpu_s / (load_end - load_start), 3),
        "gateway_cpu_us_per_delta": round(cpu_s / len(sent) * 1e6, 1),
        "gateway_rss_mib": {
            "started": round(rss_before / 2**20, 1),
            "streams_open": round(rss_open / 2**20, 1),
            "peak": round(gateway.sampler.peak_rss / 2**20, 1),
        },
        "rss_kib_per_stream": round((rss_open - rss_before) / 1024 / args.streams, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    broker = None if args.bootstrap else LocalBroker()
    try:
        bootstrap = args.bootstrap if broker is None else broker.start()
        result = asyncio.run(_run(args, bootstrap))
    finally:
        if broker is not None:
            broker.stop()
    print(json.dumps(result, indent=2))
    out = RUN_DIR / f"bench-gateway-{result['run']}.json"
    out.write_text(json.dumps(result, indent=2))
    ok = not result["missing"] and not result["delivered_twice"] and not result["stream_errors"]
    print(f"{'ok' if ok else 'FAILED'}: written to {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
