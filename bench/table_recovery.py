"""``python -m bench.table_recovery``: recovery time and memory of the ``chat-state`` table.

A changelog is filled with ``--conversations`` values, produced straight to the changelog topic in
the JSON Faust writes (key ``"conv-N"``, value ``ConversationState.to_json()``, each on the
partition its conversation's requests would have), all last active two days ago. Then one worker
process after another is started on it and measured from its start to ``/readyz`` 200, with its
RSS (psutil) once ready and at its peak:

``empty``       another app's empty changelog: the process's own start time and memory;
``full``        every conversation recovered (``WORKER_CONVERSATION_TTL_S`` 30 days);
``expiring``    a TTL of 60 s: it recovers them all, then its sweep (every 6 s) deletes every
                one; the time from ready until every tombstone is acknowledged;
``tombstones``  the changelog holds every value and its tombstone, not yet compacted;
``compacted``   after the broker's log cleaner ran over it (local broker only);
``restart``     ``--store rocksdb`` only: the ``full`` worker's RocksDB directory kept, as a
                persistent volume would keep it.

``--phases`` picks some of them. Throughout each phase, ``/healthz`` and ``/readyz`` are polled
every 150 ms on a new connection, as the kubelet probes them (``bench.probes``): what they
answered and how fast while the table was recovered, judged against the liveness probe's
timeout (``--probe-timeout-s``, 6 s as in the Deployment).

``--store rocksdb`` runs the worker through ``bench.rocksdb_worker``: the table in Faust's
RocksDB store (needs ``rocksdict``, which the project does not install) instead of the
worker's in-memory one, for the phases ``empty``, ``full`` and ``restart``.

The changelog is created as Faust creates it (``cleanup.policy=compact``, the broker's default
1 GiB segments), so up to ``tombstones`` nothing of it is cleaned: a segment is cleaned once it
is no longer the active one. Before ``compacted`` it gets what lets the log cleaner run within a
minute: ``segment.ms`` 10 s, ``min.cleanable.dirty.ratio`` 0.01 and ``delete.retention.ms`` 0,
and one record per partition, 10 s later, rolls the active segment. The run prints a table and
writes it as JSON to ``.run/table-recovery-<N>-<time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil  # type: ignore[import-untyped]  # no stubs in the dev extras
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.partitioner import murmur2

from bench.kafka import Topics
from bench.probes import Prober
from bench.procs import (
    RUN_DIR,
    SIM_KEY,
    LocalBroker,
    Pacing,
    ServiceProcess,
    Simulator,
    free_port,
)
from worker.config import setting_default
from worker.state import ConversationState, SourcePosition

DAY_S = 86_400
#: How long ago the filled conversations were last active.
AGE_S = 2 * DAY_S
#: The TTL of the ``expiring`` phase: far below ``AGE_S``, and its sweep runs every 6 s.
EXPIRING_TTL_S = 60.0
#: The changelog as Faust creates it for a table.
CHANGELOG_CONFIG = {"cleanup.policy": "compact"}
#: What lets the log cleaner run within a minute on a quiet broker, set for the last phase.
CLEAN_NOW_CONFIG = {
    **CHANGELOG_CONFIG,
    "segment.ms": "10000",
    "min.cleanable.dirty.ratio": "0.01",
    "delete.retention.ms": "0",
}
#: The phases in the order they run, and those of each store.
PHASES = ("empty", "full", "restart", "expiring", "tombstones", "compacted")
STORE_PHASES = {
    "memory": ("empty", "full", "expiring", "tombstones", "compacted"),
    "rocksdb": ("empty", "full", "restart"),
}
#: The liveness probe's timeout in the Deployment: a slower answer is a failed probe.
PROBE_TIMEOUT_S = 6.0


@dataclass
class Phase:
    """One worker process's figures."""

    name: str
    ttl_s: float
    ready_s: float
    #: Faust's own span, from its log: reading the changelog until "Restore complete!".
    restore_s: float | None
    rss_ready_mib: float
    rss_peak_mib: float
    conversations: int
    store: str = "memory"
    #: ``--store rocksdb``: the size of the table's RocksDB directory once ready.
    store_dir_mib: float | None = None
    #: ``expiring`` only: from ready until every tombstone was acknowledged.
    expired_s: float | None = None
    rss_after_expiry_mib: float | None = None
    #: What ``/healthz`` and ``/readyz`` answered (``bench.probes.ProbeSummary`` as dicts).
    probes: list[dict[str, object]] = field(default_factory=list)


def say(message: str) -> None:
    print(f"[table-recovery] {message}", flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.table_recovery", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--conversations", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=setting_default("topic_partitions"))
    parser.add_argument(
        "--ids-kept", type=int, default=4, help="finished request ids in each value"
    )
    parser.add_argument("--bootstrap", help="use this broker instead of starting a local one")
    parser.add_argument(
        "--compaction-wait-s",
        type=float,
        default=600,
        help="longest wait for the log cleaner (0: skip the compacted phase)",
    )
    parser.add_argument(
        "--store",
        choices=sorted(STORE_PHASES),
        default="memory",
        help="the table's store: the worker's own (memory) or Faust's RocksDB (needs rocksdict)",
    )
    parser.add_argument(
        "--phases",
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        help=f"comma-separated, among {', '.join(PHASES)} (default: every one of the store)",
    )
    parser.add_argument(
        "--probe-timeout-s",
        type=float,
        default=PROBE_TIMEOUT_S,
        help="a probe answered slower than this counts as failed",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    allowed = STORE_PHASES[args.store]
    if args.phases is None:
        args.phases = list(allowed)
    unknown = [name for name in args.phases if name not in allowed]
    if unknown:
        parser.error(
            f"--store {args.store} has no phase {', '.join(unknown)}: {', '.join(allowed)}"
        )
    if args.store == "rocksdb" and importlib.util.find_spec("rocksdict") is None:
        print(
            "table_recovery: --store rocksdb needs rocksdict, which the project does not install:"
            " .venv/bin/pip install rocksdict",
            file=sys.stderr,
        )
        return 2
    RUN_DIR.mkdir(exist_ok=True)
    broker = LocalBroker() if args.bootstrap is None else None
    try:
        bootstrap = args.bootstrap or broker.start()  # type: ignore[union-attr]
        phases, changelog_stats = asyncio.run(_run(args, bootstrap, broker))
    finally:
        if broker is not None:
            broker.stop()
    _report(args, phases, changelog_stats)
    return 0


async def _run(
    args: argparse.Namespace, bootstrap: str, broker: LocalBroker | None
) -> tuple[list[Phase], dict[str, object]]:
    n, partitions = args.conversations, args.partitions
    tag = f"table-{n}-{int(time.time())}"
    topics = Topics.unique(tag)
    changelog = f"{topics.app_id}-chat-state-changelog"
    await _create_topics(bootstrap, topics, changelog, partitions)
    stats: dict[str, object] = {}
    started = time.monotonic()
    stats["values_bytes"] = await _fill(bootstrap, changelog, n, partitions, args.ids_kept)
    stats["fill_s"] = round(time.monotonic() - started, 1)
    say(f"{n} conversations in {changelog} after {stats['fill_s']} s")

    simulator = Simulator(Pacing(1, 0, 0), RUN_DIR / f"{tag}-simulator.log").start()
    phases: list[Phase] = []
    wanted = set(args.phases)

    async def phase(name: str, on: Topics, ttl_s: float = 30 * DAY_S, expire: int = 0) -> None:
        if name in wanted:
            found = await _phase(
                name, on, bootstrap, simulator, partitions, ttl_s, args, expire=expire
            )
            phases.append(found)

    try:
        if "empty" in wanted:
            empty = Topics.unique(f"{tag}-empty")
            empty_changelog = f"{empty.app_id}-chat-state-changelog"
            await _create_topics(bootstrap, empty, empty_changelog, partitions)
            await phase("empty", empty)
        await phase("full", topics)
        await phase("restart", topics)
        await phase("expiring", topics, EXPIRING_TTL_S, expire=n)
        await phase("tombstones", topics)
        if "compacted" in wanted and broker is not None and args.compaction_wait_s > 0:
            stats.update(await _compact(bootstrap, broker, changelog, partitions, args))
            await phase("compacted", topics)
    finally:
        simulator.stop()
    return phases, stats


async def _create_topics(bootstrap: str, topics: Topics, changelog: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        names = [topics.requests, topics.deltas, topics.responses, topics.dlq]
        new = [NewTopic(name, partitions, 1) for name in names]
        new.append(NewTopic(changelog, partitions, 1, topic_configs=CHANGELOG_CONFIG))
        await admin.create_topics(new)
    finally:
        await admin.close()


def _values(n: int, partitions: int, ids_kept: int) -> Iterator[tuple[int, bytes, bytes]]:
    """(partition, key, value) of each conversation, as the worker would have written them."""
    now_ms = round(time.time() * 1000)
    active_ms = now_ms - AGE_S * 1000
    for i in range(n):
        conversation = f"conv-{i}"
        partition = (murmur2(conversation.encode()) & 0x7FFFFFFF) % partitions
        ids = tuple(_request_id() for _ in range(ids_kept))
        state = ConversationState(
            chat_id=f"chat_{os.urandom(16).hex()}",
            finished=ids,
            last_finished=SourcePosition(partition, i, active_ms),
            last_active_ms=active_ms,
        )
        yield partition, _json(conversation), _json(state.to_json())


def _request_id() -> str:
    hex_ = os.urandom(16).hex()
    return f"{hex_[:8]}-{hex_[8:12]}-{hex_[12:16]}-{hex_[16:20]}-{hex_[20:]}"


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


async def _fill(bootstrap: str, changelog: str, n: int, partitions: int, ids_kept: int) -> int:
    """Produce the values; returns their total size in bytes."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=512 * 1024
    )
    await producer.start()
    size = 0
    try:
        pending = []
        for partition, key, value in _values(n, partitions, ids_kept):
            size += len(key) + len(value)
            pending.append(await producer.send(changelog, value, key=key, partition=partition))
            if len(pending) >= 10_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return size


async def _phase(
    name: str,
    topics: Topics,
    bootstrap: str,
    simulator: Simulator,
    partitions: int,
    ttl_s: float,
    args: argparse.Namespace,
    *,
    expire: int = 0,
) -> Phase:
    port = free_port()
    argv = [sys.executable, "-m", "worker", "run"]
    store_dir: Path | None = None
    if args.store == "rocksdb":
        # One directory per app id: ``restart`` finds what ``full`` wrote.
        store_dir = RUN_DIR / f"{topics.app_id}-rocksdb"
        argv = [sys.executable, "-m", "bench.rocksdb_worker", "run"]
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "VAPI_BASE_URL": simulator.base_url,
        "VAPI_API_KEY": SIM_KEY,
        "VAPI_ASSISTANT_ID": "sim-assistant",
        "TOPIC_PARTITIONS": str(partitions),
        "WORKER_HTTP_PORT": str(port),
        "WORKER_CONVERSATION_TTL_S": str(ttl_s),
        "LOG_FORMAT": "json",
        **topics.env(),
    }
    if store_dir is not None:
        env["BENCH_TABLE_DATADIR"] = str(store_dir)
    log_path = RUN_DIR / f"{topics.app_id}-{name}.log"
    process = ServiceProcess(argv, env, log_path, name)
    base = f"http://127.0.0.1:{port}"
    prober = Prober(base)
    started = time.monotonic()
    process.start()
    prober.start(started)
    try:
        async with httpx.AsyncClient(base_url=base, timeout=5) as http:
            await _until(lambda: _ready(http), process, 1800, "ready")
            ready_s = time.monotonic() - started
            await asyncio.sleep(1)
            rss_ready = _rss(process)
            phase = Phase(
                name=name,
                ttl_s=ttl_s,
                ready_s=round(ready_s, 2),
                restore_s=_restore_s(log_path),
                rss_ready_mib=rss_ready,
                rss_peak_mib=0.0,
                conversations=int((await _metrics(http)).get("chat_worker_conversations", -1)),
                store=args.store,
                store_dir_mib=None if store_dir is None else _mib(_dir_bytes(store_dir)),
            )
            say(
                f"{name}: ready after {ready_s:.1f} s (restore {phase.restore_s} s), "
                f"RSS {rss_ready} MiB, {phase.conversations} conversations"
            )
            if expire:
                ready_at = time.monotonic()

                async def all_expired() -> bool:
                    got = await _metrics(http)
                    return got.get("chat_worker_conversations_expired_total", 0) >= expire

                await _until(all_expired, process, 600 + expire / 500, "all expired")
                phase.expired_s = round(time.monotonic() - ready_at, 1)
                await asyncio.sleep(1)
                phase.rss_after_expiry_mib = _rss(process)
                phase.conversations = int(
                    (await _metrics(http)).get("chat_worker_conversations", -1)
                )
                say(f"{name}: all {expire} expired after {phase.expired_s} s")
    finally:
        await prober.stop()
        await asyncio.to_thread(process.stop)
    phase.probes = [asdict(found) for found in prober.summaries(args.probe_timeout_s)]
    assert process.sampler is not None
    phase.rss_peak_mib = round(process.sampler.peak_rss / 2**20, 1)
    return phase


def _restore_s(log_path: Path) -> float | None:
    """Seconds from Faust's "Highwater for active changelog partitions" to "Restore complete!"."""
    started = ended = None
    for line in log_path.read_text(errors="replace").splitlines():
        start = line.find("{")
        if start < 0:
            continue
        try:
            record = json.loads(line[start:])
        except ValueError:
            continue
        event = str(record.get("event", ""))
        if "Highwater for active changelog partitions" in event and started is None:
            started = record.get("timestamp")
        elif "Restore complete!" in event:
            ended = record.get("timestamp")
    if started is None or ended is None:
        return None
    span = datetime.fromisoformat(ended) - datetime.fromisoformat(started)
    return round(span.total_seconds(), 2)


async def _ready(http: httpx.AsyncClient) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return (await http.get("/readyz")).status_code == 200
    return False


async def _metrics(http: httpx.AsyncClient) -> dict[str, float]:
    found: dict[str, float] = {}
    for line in (await http.get("/metrics")).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


async def _until(
    check: Callable[[], Awaitable[bool]], process: ServiceProcess, timeout_s: float, what: str
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if process.exited() is not None:
            raise RuntimeError(f"worker exited before {what}:\n{process.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"worker not {what} within {timeout_s} s:\n{process.log_tail()}")
        await asyncio.sleep(0.1)


def _rss(process: ServiceProcess) -> float:
    assert process.proc is not None
    return round(int(psutil.Process(process.proc.pid).memory_info().rss) / 2**20, 1)


async def _compact(
    bootstrap: str,
    broker: LocalBroker,
    changelog: str,
    partitions: int,
    args: argparse.Namespace,
) -> dict[str, object]:
    """Roll the changelog's active segments and wait for the cleaner to shrink it."""
    data = RUN_DIR / f"kafka-{broker.env['LOCAL_KAFKA_PORT']}" / "data"
    before = _bytes_on_disk(data, changelog)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, changelog, CLEAN_NOW_CONFIG)]
        )
    finally:
        await admin.close()
    await asyncio.sleep(11)  # past segment.ms, so the next record rolls the segment
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        # A tombstone of a key that never had a value: it changes no table.
        sent = [
            await producer.send(changelog, None, key=_json("bench-segment-roll"), partition=p)
            for p in range(partitions)
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()
    started = time.monotonic()
    last, still_since = before, time.monotonic()
    while time.monotonic() - started < args.compaction_wait_s:
        await asyncio.sleep(5)
        now = _bytes_on_disk(data, changelog)
        if now < last:
            last, still_since = now, time.monotonic()
        elif now < before and time.monotonic() - still_since > 45:
            break  # shrunk, and no pass of the cleaner for 45 s (its back-off is 15 s)
    waited = round(time.monotonic() - started, 1)
    say(f"changelog on disk: {before / 2**20:.1f} MiB -> {last / 2**20:.1f} MiB after {waited} s")
    return {
        "changelog_mib_before_compaction": round(before / 2**20, 1),
        "changelog_mib_after_compaction": round(last / 2**20, 1),
        "compaction_wait_s": waited,
    }


def _dir_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def _mib(size: int) -> float:
    return round(size / 2**20, 1)


def _bytes_on_disk(data: Path, topic: str) -> int:
    return sum(
        path.stat().st_size
        for directory in data.glob(f"{topic}-*")
        for path in directory.glob("*.log")
    )


def _report(args: argparse.Namespace, phases: list[Phase], stats: dict[str, object]) -> None:
    n = args.conversations
    empty = next((p for p in phases if p.name == "empty"), None)
    full = next((p for p in phases if p.name == "full"), None)
    print()
    print(
        f"chat-state table, {n:,} conversations, {args.partitions} partitions, {args.store} store"
    )
    print(
        f"{'phase':<11} {'ready s':>8} {'restore s':>10} {'RSS MiB':>8} {'peak MiB':>9} "
        f"{'entries':>9}  note"
    )
    for p in phases:
        note = ""
        if p.expired_s is not None:
            note = f"all expired {p.expired_s} s after ready; RSS then {p.rss_after_expiry_mib}"
        if p.store_dir_mib is not None:
            note = f"RocksDB directory {p.store_dir_mib} MiB"
        restore = "-" if p.restore_s is None else f"{p.restore_s:.1f}"
        print(
            f"{p.name:<11} {p.ready_s:>8.1f} {restore:>10} {p.rss_ready_mib:>8.1f} "
            f"{p.rss_peak_mib:>9.1f} {p.conversations:>9,}  {note}"
        )
    per_entry = None
    if empty is not None and full is not None and n:
        per_entry = round((full.rss_ready_mib - empty.rss_ready_mib) * 2**20 / n)
        print(f"memory per conversation (full - empty RSS): {per_entry} bytes")
    for key, value in stats.items():
        print(f"{key}: {value}")
    print()
    print(
        f"probes every 150 ms on a new connection; failed: not 2xx/3xx within "
        f"{args.probe_timeout_s:g} s; latencies of the polls that reached the server"
    )
    print(
        f"{'phase':<11} {'path':<8} {'polls':>6} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
        f"{'at s':>7} {'slow':>5} {'first ok s':>10} {'failing s':>9}  statuses"
    )
    for p in phases:
        for probe in p.probes:
            first_ok = probe["first_ok_s"]
            print(
                f"{p.name:<11} {probe['path']!s:<8} {probe['polls']!s:>6} "
                f"{_cell(probe['p50_ms']):>7} {_cell(probe['p99_ms']):>7} "
                f"{_cell(probe['max_ms']):>7} {_cell(probe['slowest_at_s']):>7} "
                f"{probe['slower_than_timeout']!s:>5} "
                f"{_cell(first_ok):>10} {_cell(probe['longest_failing_s']):>9}  "
                f"{probe['statuses']}"
            )
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RUN_DIR / f"table-recovery-{args.store}-{n}-{stamp}.json"
    out.write_text(
        json.dumps(
            {
                "conversations": n,
                "partitions": args.partitions,
                "store": args.store,
                "probe_timeout_s": args.probe_timeout_s,
                "ids_kept": args.ids_kept,
                "phases": [asdict(p) for p in phases],
                "bytes_per_conversation": per_entry,
                **stats,
            },
            indent=2,
        )
    )
    print(f"written to {out}")


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


if __name__ == "__main__":
    raise SystemExit(main())
