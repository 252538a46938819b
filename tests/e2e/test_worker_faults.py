"""Worker and Kafka faults: SIGKILL, rebalances, a broker restart, SIGTERM, outputs Kafka will
not take, and the secrets.

Every run is checked by one helper, ``check_invariants``: each request has exactly one final
response of the expected status (none lost, no duplicates), each conversation's chain of chat ids
is unbroken in offset order, no request reached the simulator more often than its faults explain
(twice, or once more for each kill that cut it short), and a request recorded as finished
before a crash is not sent to the simulator again after it.

One duplicate is allowed, and only under SIGKILL: a request whose response was out before the
kill while its "finished" record (the ``chat-state`` changelog) was not yet. That is the residual
window of at-least-once without Kafka transactions (docs/design.md §5.3); the check proves each
duplicate lies in it, from Kafka timestamps, and counts it. The counts of every run are printed
and appended as one JSON line to ``.run/fault-report.jsonl``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import signal
import subprocess
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from tests.e2e.harness import (
    ROOT,
    LocalBroker,
    OutputReader,
    SimulatorProcess,
    Topics,
    UnwritableTopic,
    WorkerProcess,
    Workers,
    calls_by_request,
    committed_offsets,
    paced,
    produce,
    read_topic,
    request_record,
    wait_committed_past,
    wait_until,
)

pytestmark = pytest.mark.e2e

REPORT = ROOT / ".run" / "fault-report.jsonl"


# --- the plan of a run and its invariants -----------------------------------------------------


@dataclass
class Plan:
    """The requests of a run: per conversation, its request ids in offset order."""

    turns: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    records: list[tuple[bytes, bytes]] = field(default_factory=list)
    #: (partition, offset) of each request, filled by ``send``.
    placed: dict[str, tuple[int, int]] = field(default_factory=dict)

    def add(self, conversation: str, turn: int, text: str) -> str:
        request_id = f"{conversation}-{turn}"
        self.turns[conversation].append(request_id)
        self.records.append(request_record(conversation, request_id, text))
        return request_id

    @property
    def request_ids(self) -> list[str]:
        return [rid for rids in self.turns.values() for rid in rids]

    async def send(self, bootstrap: str, topic: str, request_ids: Sequence[str] = ()) -> None:
        """Produce the planned records (all, or only ``request_ids``), in plan order."""
        wanted = set(request_ids)
        chosen = [r for r in self.records if not wanted or json.loads(r[1])["request_id"] in wanted]
        metadata = await produce(bootstrap, topic, chosen)
        for (_, value), meta in zip(chosen, metadata, strict=True):
            self.placed[json.loads(value)["request_id"]] = (meta.partition, meta.offset)


@dataclass
class Counts:
    """One line of the fault report."""

    fault: str
    runs: int
    requests: int
    completed: int
    failed_with_error: int
    lost: int
    duplicate_finals: int
    duplicate_vapi_calls: int


def response_times(reader: OutputReader) -> dict[str, list[float]]:
    """Kafka timestamps (seconds) of every response record, by request id."""
    times: dict[str, list[float]] = defaultdict(list)
    for record in reader.records:
        if record.topic == reader.topics.responses:
            times[json.loads(record.value)["request_id"]].append(record.timestamp / 1000)
    return times


@dataclass
class Evidence:
    """What a run left behind, by request id: simulator calls and Kafka record times (seconds)."""

    finals: dict[str, list[dict[str, Any]]]
    calls: dict[str, list[dict[str, Any]]]
    #: Timestamps of the request's response records.
    published: dict[str, list[float]]
    #: Timestamp of the first changelog record listing the request as finished (its dedupe key).
    recorded: dict[str, float]
    kills: Sequence[float]

    def in_residual_window(self, rid: str, killed_at: float) -> bool:
        """The response was out before the kill, the "finished" record not yet.

        That is the residual window (docs/design.md §5.3): a SIGKILL between the two leaves the
        request uncommitted and not marked finished, so the next worker answers it again, the one
        duplicate at-least-once allows.
        """
        out = [t for t in self.published.get(rid, []) if t < killed_at]
        return bool(out) and self.recorded.get(rid, float("inf")) >= killed_at

    def kills_explaining_a_call(self, rid: str) -> int:
        """Kills that cut ``rid`` short: after a call of it started and before its response was
        out (in the stream, or between the stream's end and the response), or in its residual
        window."""
        return sum(
            (
                any(c["started_at"] < k for c in self.calls[rid])
                and not any(t < k for t in self.published.get(rid, []))
            )
            or self.in_residual_window(rid, k)
            for k in self.kills
        )


async def gather_evidence(
    reader: OutputReader, calls: list[dict[str, Any]], kills: Sequence[float]
) -> Evidence:
    calls_of: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for call in calls:
        calls_of[call["request_id"]].append(call)
    published = response_times(reader)
    recorded: dict[str, float] = {}
    for record in await read_topic(reader.bootstrap, reader.topics.changelog()):
        for rid in json.loads(record.value or b"{}").get("finished", []):
            recorded[rid] = min(recorded.get(rid, math.inf), record.timestamp / 1000)
    return Evidence(reader.outputs.responses_by_request(), calls_of, published, recorded, kills)


async def check_invariants(
    fault: str,
    plan: Plan,
    reader: OutputReader,
    calls: list[dict[str, Any]],
    *,
    runs: int,
    kills: Sequence[float] = (),
    expect_failed: frozenset[str] = frozenset(),
) -> Counts:
    """Report the run's counts, then assert the invariants every fault run must keep.

    ``kills`` are the wall-clock times the worker was SIGKILLed; ``expect_failed`` the requests
    that must end with one ``failed`` response (the rest must end with one ``completed``).

    1. Every request has exactly one final response, of the expected status; none is lost. The
       only duplicate allowed is a SIGKILL's residual window (``Evidence.in_residual_window``),
       and it is counted in the report.
    2. Every conversation's chain is unbroken, in offset order: each turn's responses continue
       from the chat of the turn before (its last answer, the one the table recorded), and each
       response's chat is one the simulator completed for that request.
    3. No request reached the simulator more than twice, or once more than the kills that cut
       it short (a call started, the response not out yet) or fell in its residual window.
    4. A request recorded as finished before a kill is not sent to the simulator after it.
    """
    evidence = await gather_evidence(reader, calls, kills)
    finals, calls_of = evidence.finals, evidence.calls
    wanted = plan.request_ids
    responses = reader.outputs.responses
    counts = Counts(
        fault=fault,
        runs=runs,
        requests=len(wanted),
        completed=sum(r["status"] == "completed" for r in responses),
        failed_with_error=sum(
            r["status"] == "failed" and r["error"] is not None for r in responses
        ),
        lost=sum(not finals.get(rid) for rid in wanted),
        duplicate_finals=sum(max(0, len(finals.get(rid, [])) - 1) for rid in wanted),
        duplicate_vapi_calls=sum(max(0, len(calls_of[rid]) - 1) for rid in wanted),
    )
    _report(counts)
    for rid in wanted:
        for killed_at in kills:
            if len(finals.get(rid, [])) > 1 and evidence.in_residual_window(rid, killed_at):
                ahead = killed_at - min(evidence.published[rid])
                print(f"residual window: {rid} answered {ahead:.3f} s before a kill, not recorded")

    problems = _final_problems(wanted, evidence, expect_failed)
    problems += _chain_problems(plan, evidence)
    problems += [
        f"{rid}: reached the simulator {len(calls_of[rid])} times"
        for rid in wanted
        if len(calls_of[rid]) > max(2, 1 + evidence.kills_explaining_a_call(rid))
    ]
    problems += _resent_after_crash(wanted, evidence)
    if problems:
        involved = list(dict.fromkeys(p.split(":")[0] for p in problems))[:6]
        raise AssertionError(
            f"{len(problems)} invariant violations:\n"
            + "\n".join(problems[:40])
            + "\n\ntimelines (seconds since the first kill, or since the first call):\n"
            + "\n".join(_timeline(rid, evidence) for rid in involved)
        )
    return counts


def _report(counts: Counts) -> None:
    print(f"fault report: {json.dumps(asdict(counts))}")
    REPORT.parent.mkdir(exist_ok=True)
    with REPORT.open("a") as report:
        report.write(json.dumps(asdict(counts)) + "\n")


def _final_problems(
    wanted: list[str], evidence: Evidence, expect_failed: frozenset[str]
) -> list[str]:
    problems = []
    for rid in wanted:
        statuses = [r["status"] for r in evidence.finals.get(rid, [])]
        expected = "failed" if rid in expect_failed else "completed"
        if statuses == [expected]:
            continue
        excused = (
            expected == "completed"
            and len(statuses) == 2
            and set(statuses) == {"completed"}
            and any(evidence.in_residual_window(rid, k) for k in evidence.kills)
        )
        if not excused:
            errors = [r["error"] for r in evidence.finals.get(rid, []) if r["error"]]
            problems.append(f"{rid}: final responses {statuses}, expected [{expected}] {errors}")
    return problems


def _chain_problems(plan: Plan, evidence: Evidence) -> list[str]:
    problems = []
    for conversation, request_ids in plan.turns.items():
        previous: str | None = None
        for rid in request_ids:
            completed = [r for r in evidence.finals.get(rid, []) if r["status"] == "completed"]
            done = {c["chat_id"] for c in evidence.calls[rid] if c["outcome"] == "completed"}
            for response in completed:
                if response["previous_chat_id"] != previous:
                    problems.append(
                        f"{rid}: continued from {response['previous_chat_id']}, "
                        f"the turn before of {conversation} ended in {previous}"
                    )
                if response["chat_id"] not in done:
                    problems.append(f"{rid}: chat {response['chat_id']} is no completed call")
            if completed:
                previous = completed[-1]["chat_id"]
    return problems


def _resent_after_crash(wanted: list[str], evidence: Evidence) -> list[str]:
    problems = []
    for killed_at in evidence.kills:
        for rid in wanted:
            if evidence.recorded.get(rid, math.inf) >= killed_at:
                continue
            again = [c for c in evidence.calls[rid] if c["started_at"] > killed_at]
            if again:
                problems.append(
                    f"{rid}: recorded as finished before the kill at {killed_at:.3f}, "
                    f"yet sent to the simulator again after it ({len(again)} call(s))"
                )
    return problems


def _timeline(rid: str, evidence: Evidence) -> str:
    """One request's calls, responses, state record and nearby kills, for a failure message."""
    calls = evidence.calls[rid]
    kills = evidence.kills
    origin = kills[0] if kills else min((c["started_at"] for c in calls), default=0.0)
    events = [(c["started_at"], f"call {c['outcome']} {c['chat_id']}") for c in calls]
    events += [(c["ended_at"] or 0.0, "call ended") for c in calls]
    events += [(t, "response published") for t in evidence.published.get(rid, [])]
    if rid in evidence.recorded:
        events.append((evidence.recorded[rid], "finished recorded"))
    near = [t for t, _ in events]
    events += [(k, "KILL") for k in kills if near and min(near) - 5 < k < max(near) + 5]
    return f"{rid}: " + "; ".join(f"{t - origin:+.3f} {what}" for t, what in sorted(events))


async def wait_all_answered(reader: OutputReader, plan: Plan, timeout_s: float) -> None:
    """Wait for a final response to every planned request; on timeout, say what is missing.

    The message lists the unanswered requests with their partition and offset, and the group's
    committed offsets: a commit past one of them means it was lost, not merely slow.
    """
    try:
        await reader.wait_for_responses(plan.request_ids, timeout_s)
    except AssertionError:
        answered = {r["request_id"] for r in reader.outputs.responses}
        missing = {rid: plan.placed.get(rid) for rid in plan.request_ids if rid not in answered}
        topics = reader.topics
        committed = await committed_offsets(reader.bootstrap, topics.app_id, topics.requests)
        raise AssertionError(
            f"{len(missing)} of {len(plan.request_ids)} requests unanswered after {timeout_s} s; "
            f"(partition, offset) of the first: {dict(sorted(missing.items())[:12])}; "
            f"committed offsets: {committed}"
        ) from None


# --- 1. SIGKILL -------------------------------------------------------------------------------


class Waves:
    """Produces the plan's next turn for every conversation, one wave at a time."""

    def __init__(
        self,
        plan: Plan,
        bootstrap: str,
        topic: str,
        conversations: Sequence[str],
        text: Callable[[str, int], str],
    ) -> None:
        self.plan, self._bootstrap, self._topic = plan, bootstrap, topic
        self._conversations, self._text = conversations, text
        self.turns = 0

    async def send(self, waves: int = 1) -> None:
        for _ in range(waves):
            self.turns += 1
            ids = [
                self.plan.add(conv, self.turns, self._text(conv, self.turns))
                for conv in self._conversations
            ]
            await self.plan.send(self._bootstrap, self._topic, ids)

    async def every(self, interval_s: float, stop: asyncio.Event) -> None:
        """One turn per conversation per interval, spread over it, until ``stop`` is set.

        Staggered, so that streams overlap all the time instead of starting and ending together.
        """
        producer = AIOKafkaProducer(bootstrap_servers=self._bootstrap, enable_idempotence=True)
        await producer.start()
        try:
            while not stop.is_set():
                self.turns += 1
                for conv in self._conversations:
                    rid = self.plan.add(conv, self.turns, self._text(conv, self.turns))
                    key, value = self.plan.records[-1]
                    meta = await (await producer.send(self._topic, value, key=key))
                    self.plan.placed[rid] = (meta.partition, meta.offset)
                    await asyncio.sleep(interval_s / len(self._conversations))
        finally:
            await producer.stop()


CRASH_CONVERSATIONS = 30
CRASH_TURNS = 10
CRASH_KILLS = 3


@pytest.mark.timeout(420)
async def test_sigkill_at_random_moments_loses_nothing_and_duplicates_nothing(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, workers: Workers
) -> None:
    """300+ requests over 30 conversations survive three SIGKILLs mid-stream, invariants kept.

    Four turns go out first, three more before each further kill, and a kill waits for a stream
    in flight. It also waits until everything the previous kill touched is committed, so no
    request meets two kills.
    """
    seed = int(os.environ.get("FAULT_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    print(f"FAULT_SEED={seed}")
    plan = Plan()
    conversations = [f"c{c:02d}" for c in range(CRASH_CONVERSATIONS)]
    waves = Waves(
        plan,
        kafka_bootstrap,
        topics.requests,
        conversations,
        lambda conv, turn: paced(f"Turn {turn} of {conv}.", rng.randint(10, 20), 30),
    )
    worker = await workers.start_ready("crash-0")
    kills: list[float] = []
    async with OutputReader(kafka_bootstrap, topics) as reader:
        await waves.send(4)
        while len(kills) < CRASH_KILLS:
            if kills:
                await wait_committed(kafka_bootstrap, topics, plan, simulator, before=kills[-1])
                await waves.send(3)
            await asyncio.sleep(rng.uniform(0.3, 1.2))
            await wait_until(lambda: simulator.stats()["streams_in_flight"] > 0, 60, "a stream")
            kills.append(time.time())
            worker.kill()
            worker = await workers.start_ready(f"crash-{len(kills)}")
        await waves.send(max(0, CRASH_TURNS - waves.turns))
        await wait_all_answered(reader, plan, 240)
        await asyncio.sleep(3)  # room for a late duplicate to show up
        calls = simulator.calls()
        counts = await check_invariants(
            "sigkill", plan, reader, calls, runs=len(kills) + 1, kills=kills
        )
    assert counts.requests >= CRASH_CONVERSATIONS * CRASH_TURNS
    for number, killed_at in enumerate(kills, start=1):
        cut = [c for c in calls if c["started_at"] < killed_at <= (c["ended_at"] or math.inf)]
        print(f"kill {number}: {len(cut)} streams in flight")
        assert cut, f"kill {number} hit no stream in flight"


HOSTILE_CONVERSATIONS = 20
HOSTILE_TURNS = 5
HOSTILE_KILLS = 3


def hostile_kill_delays(rng: random.Random) -> list[float]:
    """Seconds from each process's start (the first: from producing) to its SIGKILL.

    ``HOSTILE_KILL_DELAYS=2.97,2.45,3.95`` replays given ones. Drawn at random otherwise: the
    first process, streaming from the start, within 5 s; each restarted one from 0.5 s (still
    starting, or waiting for the dead members to leave the group) to 10 s (recovering, or
    streaming again).
    """
    given = os.environ.get("HOSTILE_KILL_DELAYS", "").strip()
    if given:
        return [float(delay) for delay in given.split(",")]
    later = [round(rng.uniform(0.5, 10.0), 2) for _ in range(HOSTILE_KILLS - 1)]
    return [round(rng.uniform(0.5, 5.0), 2), *later]


@pytest.mark.timeout(420)
async def test_sigkills_during_joins_and_recovery_lose_nothing(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, workers: Workers
) -> None:
    """SIGKILLs a few seconds apart, each process restarted at once, no wait for any commit.

    The kills land wherever they land: during start-up, while the killed members still hold
    the group, in the middle of recovery, with streams in flight. Every request still gets
    exactly one final (or two, only in the residual window of a kill), and nothing is skipped:
    a process that takes over partitions nobody ever committed reads them from the start.
    """
    seed = int(os.environ.get("FAULT_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    delays = hostile_kill_delays(rng)
    print(f"FAULT_SEED={seed} kill delays={delays}")
    plan = Plan()
    for turn in range(1, HOSTILE_TURNS + 1):
        for c in range(HOSTILE_CONVERSATIONS):
            plan.add(f"h{c:02d}", turn, paced(f"Turn {turn} of h{c:02d}.", 13, 60))
    env = {"TOPIC_PARTITIONS": "8"}
    if os.environ.get("HOSTILE_SESSION_TIMEOUT"):
        env["BROKER_SESSION_TIMEOUT"] = os.environ["HOSTILE_SESSION_TIMEOUT"]
    worker = await workers.start_ready("hostile-0", **env)
    kills: list[float] = []
    async with OutputReader(kafka_bootstrap, topics) as reader:
        await plan.send(kafka_bootstrap, topics.requests)
        for number, delay in enumerate(delays, start=1):
            await asyncio.sleep(delay)
            kills.append(time.time())
            worker.kill()
            worker = workers.start(f"hostile-{number}", **env)
        await wait_all_answered(reader, plan, 240)
        await asyncio.sleep(3)  # room for a late duplicate to show up
        await check_invariants(
            "sigkill-hostile", plan, reader, simulator.calls(), runs=len(kills) + 1, kills=kills
        )


@pytest.mark.timeout(300)
async def test_two_sigkills_on_the_same_request_still_end_in_one_final(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, workers: Workers
) -> None:
    """A long reply is cut by a SIGKILL, and its redelivery is cut by the next one.

    Each kill waits for the request to be streaming (not for any commit); the third process
    answers it once, continuing the conversation from the turn before.
    """
    plan = Plan()
    plan.add("twice", 1, paced("Short first turn.", 3, 20))
    plan.add("twice", 2, paced("A long second turn.", 80, 100))
    plan.add("twice", 3, paced("Short third turn.", 3, 20))
    long_turn = "twice-2"

    def streaming(calls_before: int) -> Callable[[], bool]:
        def check() -> bool:
            calls = calls_by_request(simulator)[long_turn]
            return len(calls) > calls_before and calls[-1]["deltas_sent"] >= 2

        return check

    worker = await workers.start_ready("twice-0")
    kills: list[float] = []
    async with OutputReader(kafka_bootstrap, topics) as reader:
        await plan.send(kafka_bootstrap, topics.requests)
        for number in (1, 2):
            await wait_until(streaming(number - 1), 120, f"call {number} of {long_turn}")
            kills.append(time.time())
            worker.kill()
            worker = workers.start(f"twice-{number}")
        await wait_all_answered(reader, plan, 180)
        await asyncio.sleep(2)
        calls = simulator.calls()
        await check_invariants("sigkill-twice", plan, reader, calls, runs=3, kills=kills)
    cut = [c for c in calls if c["request_id"] == long_turn and c["outcome"] != "completed"]
    assert len(cut) == 2, f"expected both kills to cut {long_turn}: {cut}"


@pytest.mark.timeout(300)
async def test_partitions_nobody_committed_are_read_from_the_start_after_a_takeover(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, workers: Workers
) -> None:
    """A member dies before the group ever committed its partitions; the survivor takes them.

    The survivor's fetcher is running when the partitions move to it, so it fetches their
    records while its flow is stopped for the rebalance, and Faust drops them: the survivor
    must read them again, not start where that fetch left off.
    """
    env = {"TOPIC_PARTITIONS": "8"}
    survivor = workers.start("survivor", **env)
    doomed = workers.start("doomed", **env)
    for worker in (survivor, doomed):
        await asyncio.to_thread(worker.wait_ready, 120)
    plan = Plan()
    for turn in range(1, 4):
        for c in range(16):
            plan.add(f"t{c:02d}", turn, paced(f"Turn {turn}.", 30, 100))
    async with OutputReader(kafka_bootstrap, topics) as reader:
        await plan.send(kafka_bootstrap, topics.requests)
        await wait_until(lambda: simulator.stats()["streams_in_flight"] >= 8, 60, "8 streams")
        kills = [time.time()]
        doomed.kill()
        await wait_all_answered(reader, plan, 240)
        await asyncio.sleep(2)
        await check_invariants(
            "takeover-uncommitted", plan, reader, simulator.calls(), runs=2, kills=kills
        )
    assert survivor.proc is not None
    assert survivor.proc.poll() is None


async def wait_committed(
    bootstrap: str, topics: Topics, plan: Plan, sim: SimulatorProcess, *, before: float
) -> None:
    """Wait until the group committed past every request the simulator saw before ``before``."""
    touched: dict[int, int] = {}
    for call in sim.calls():
        if call["started_at"] < before and call["request_id"] in plan.placed:
            partition, offset = plan.placed[call["request_id"]]
            touched[partition] = max(offset, touched.get(partition, -1))
    await wait_committed_past(bootstrap, topics, touched, 120)


# --- 2. a worker joins, another leaves --------------------------------------------------------


@pytest.mark.timeout(300)
async def test_a_worker_joining_and_one_leaving_mid_run_keep_every_invariant(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, workers: Workers
) -> None:
    """Two workers share the group, a third joins and one leaves on SIGTERM: nothing breaks.

    Every conversation gets a turn every 1.5 s, staggered, until after the leave, so both
    rebalances happen with streams in flight.
    """
    plan = Plan()
    conversations = [f"r{c:02d}" for c in range(12)]
    waves = Waves(
        plan,
        kafka_bootstrap,
        topics.requests,
        conversations,
        # Replies of 0.4 s to 1 s, staggered: several streams are in flight at any moment.
        lambda conv, turn: paced(f"Turn {turn} of {conv}.", 6 + int(conv[1:]), 60),
    )
    env = {"TOPIC_PARTITIONS": "6"}

    def in_flight() -> bool:
        return bool(simulator.stats()["streams_in_flight"] > 0)

    first = workers.start("first", **env)
    second = workers.start("second", **env)
    for worker in (first, second):
        await asyncio.to_thread(worker.wait_ready, 120)
    stop = asyncio.Event()
    async with OutputReader(kafka_bootstrap, topics) as reader:
        feeding = asyncio.create_task(waves.every(1.5, stop))
        try:
            await reader.wait_for(lambda out: len(out.responses) >= 12, 60, "12 responses")
            # Each change of membership comes while streams are in flight: the moment is when
            # one is, not after a fixed sleep (on a loaded machine the feed may be between waves).
            await wait_until(in_flight, 30, "a stream in flight before the join")
            third = workers.start("third", **env)
            await asyncio.to_thread(third.wait_ready, 120)
            await asyncio.sleep(1.5)
            await wait_until(in_flight, 30, "a stream in flight before the leave")
            assert await asyncio.to_thread(first.terminate) == 0, first.log_tail()
            await asyncio.sleep(2)
        finally:
            stop.set()
            await feeding
        await wait_all_answered(reader, plan, 180)
        await asyncio.sleep(2)
        await check_invariants("rebalance", plan, reader, simulator.calls(), runs=3)


# --- 3. broker restart ------------------------------------------------------------------------

BROKER_RESTART_TEST = "test_the_worker_reconnects_after_a_broker_restart_mid_run"


@pytest.fixture(scope="module", autouse=True)
def dedicated_broker(request: pytest.FixtureRequest) -> Iterator[LocalBroker | None]:
    """Start the broker-restart test's own broker early, in the background, if that test runs."""
    if not any(item.name == BROKER_RESTART_TEST for item in request.session.items):
        yield None
        return
    broker = LocalBroker()
    broker.begin_up()
    try:
        yield broker
    finally:
        with contextlib.suppress(Exception):
            if broker._up is not None and broker._up.poll() is None:
                broker._up.communicate(timeout=300)
        broker.run("down")


@pytest.mark.timeout(420)
async def test_the_worker_reconnects_after_a_broker_restart_mid_run(
    dedicated_broker: LocalBroker | None, unique_name: str, tmp_path: Path
) -> None:
    """The broker stops and comes back on its data mid-run; the same worker process carries on."""
    assert dedicated_broker is not None
    bootstrap = await asyncio.to_thread(dedicated_broker.bootstrap)
    topics = Topics.unique(unique_name)
    sim = SimulatorProcess().start()
    group = Workers(bootstrap, topics, sim, tmp_path)
    try:
        plan = Plan()
        for turn in range(1, 7):
            for c in range(10):
                plan.add(f"b{c}", turn, paced(f"Turn {turn}.", 15, 60))
        worker = await group.start_ready("broker")
        async with OutputReader(bootstrap, topics) as reader:
            first_five = [rid for rid in plan.request_ids if int(rid.rsplit("-", 1)[1]) <= 5]
            await plan.send(bootstrap, topics.requests, first_five)
            await reader.wait_for(lambda out: len(out.responses) >= 10, 60, "10 responses")
            in_flight = sim.stats()["streams_in_flight"]
            await asyncio.to_thread(dedicated_broker.run, "stop")
            await asyncio.sleep(2)
            await asyncio.to_thread(dedicated_broker.run, "resume")
            assert in_flight > 0, "the broker stopped when no stream was in flight"
            # Requests sent after the restart are answered by the same process.
            await plan.send(bootstrap, topics.requests, [f"b{c}-6" for c in range(10)])
            await wait_all_answered(reader, plan, 240)
            await asyncio.sleep(2)
            assert worker.proc is not None
            assert worker.proc.poll() is None, worker.log_tail()
            await check_invariants("broker-restart", plan, reader, sim.calls(), runs=1)
    finally:
        group.stop_all()
        sim.stop()


# --- 4. revoked partitions --------------------------------------------------------------------


@pytest.mark.timeout(300)
async def test_revoked_partitions_cancel_their_streams_commit_nothing_and_move_on(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, workers: Workers
) -> None:
    """A joining worker revokes streams in flight: cut, left uncommitted, answered once after.

    Each conversation's quick first turn is committed; its second turn stalls on its first call
    (only), so it is surely streaming when the second worker joins; a quick third turn follows.
    """
    stall = "[[sim:fault stall after=2 seconds=40 times=1]]"
    plan = Plan()
    for c in range(8):
        plan.add(f"v{c}", 1, paced("Quick first.", 4, 20))
        plan.add(f"v{c}", 2, paced("Take your time.", 8, 40, extra=stall))
        plan.add(f"v{c}", 3, paced("And the next one.", 6, 30))
    stalled = [f"v{c}-2" for c in range(8)]
    env = {"WORKER_REBALANCE_GRACE_S": "0.5", "VAPI_STALL_TIMEOUT_S": "90"}
    await workers.start_ready("owner", **env)
    snapshots: list[tuple[float, dict[int, int]]] = []

    async def watch_commits() -> None:
        while True:
            offsets = await committed_offsets(kafka_bootstrap, topics.app_id, topics.requests)
            snapshots.append((time.time(), offsets))
            await asyncio.sleep(0.1)

    def all_stalled() -> bool:
        calls = calls_by_request(simulator)
        return all(calls[rid] and calls[rid][0]["deltas_sent"] >= 2 for rid in stalled)

    async with OutputReader(kafka_bootstrap, topics) as reader:
        await plan.send(kafka_bootstrap, topics.requests)
        frontier: dict[int, int] = {}  # per partition, the lowest offset of a stalled request
        for rid in stalled:
            partition, offset = plan.placed[rid]
            frontier[partition] = min(offset, frontier.get(partition, offset))
        watcher = asyncio.create_task(watch_commits())
        try:
            await wait_until(all_stalled, 60, "every second turn streaming")
            # The commit moves over the quick first turns and stops right at the stalled ones.
            await wait_until(
                lambda: (
                    bool(snapshots)
                    and all(snapshots[-1][1].get(p) == o for p, o in frontier.items())
                ),
                60,
                f"the commit at {frontier}",
            )
            await workers.start_ready("joiner", **env)
            await wait_all_answered(reader, plan, 120)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        calls = calls_by_request(simulator)
        published = response_times(reader)
        for rid in stalled:
            first, *again = calls[rid]
            assert first["outcome"] == "client_closed", first
            assert [c["outcome"] for c in again] == ["completed"], calls[rid]
            partition, offset = plan.placed[rid]
            before_answer = [o for at, o in snapshots if at < min(published[rid])]
            assert all(o.get(partition, 0) <= offset for o in before_answer), (rid, offset)
        await check_invariants("revoke", plan, reader, simulator.calls(), runs=2)


# --- 5. graceful shutdown ---------------------------------------------------------------------


@pytest.mark.timeout(300)
async def test_sigterm_finishes_short_streams_cuts_long_ones_and_exits_zero(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, workers: Workers
) -> None:
    """SIGTERM: no new records, streams within the grace finish and commit, longer ones move on."""
    grace = 4.0
    plan = Plan()
    short = [plan.add(f"s{c}", 1, paced("Short one.", 16, 100)) for c in range(4)]
    stall = "[[sim:fault stall after=2 seconds=40 times=1]]"
    long = [plan.add(f"l{c}", 1, paced("Long one.", 6, 40, extra=stall)) for c in range(4)]
    late = plan.add("late", 1, paced("Sent after SIGTERM.", 5, 20))
    env = {"WORKER_SHUTDOWN_GRACE_S": str(grace), "VAPI_STALL_TIMEOUT_S": "90"}
    first = await workers.start_ready("stopping", **env)
    async with OutputReader(kafka_bootstrap, topics) as reader:
        await plan.send(kafka_bootstrap, topics.requests, [*short, *long])

        def all_streaming() -> bool:
            calls = calls_by_request(simulator)
            return all(calls[rid] and calls[rid][0]["deltas_sent"] >= 1 for rid in short + long)

        await wait_until(all_streaming, 60, "every request streaming")
        assert first.proc is not None
        first.proc.send_signal(signal.SIGTERM)
        await plan.send(kafka_bootstrap, topics.requests, [late])
        exit_code = await asyncio.to_thread(first.proc.wait, 60)
        exited_at = time.time()
        assert first.terminate() == exit_code == 0, first.log_tail()

        calls = calls_by_request(simulator)
        published = response_times(reader)
        await reader.wait_for_responses(short, 10)
        for rid in short:
            assert [c["outcome"] for c in calls[rid]] == ["completed"], calls[rid]
        for rid in long:
            assert [c["outcome"] for c in calls[rid]] == ["client_closed"], calls[rid]
            assert rid not in published, f"{rid} was answered before the restart"
        assert not calls.get(late), "the stopping worker took a record after SIGTERM"
        committed = await committed_offsets(kafka_bootstrap, topics.app_id, topics.requests)
        for rid in short:
            partition, offset = plan.placed[rid]
            assert committed.get(partition, 0) > offset, (rid, plan.placed[rid], committed)
        for rid in long:
            partition, offset = plan.placed[rid]
            assert committed.get(partition, 0) <= offset, (rid, plan.placed[rid], committed)

        await workers.start_ready("next", **env)
        await wait_all_answered(reader, plan, 60)
        await asyncio.sleep(2)
        calls = calls_by_request(simulator)
        assert all(len(calls[rid]) == 1 for rid in short), "a finished stream was sent again"
        assert all(c["started_at"] > exited_at for c in calls[late])
        await check_invariants("sigterm", plan, reader, simulator.calls(), runs=2)


# --- 6. outputs Kafka will not take ----------------------------------------------------------

#: Time a worker may take, after its bound, to commit, leave the group and exit.
EXIT_MARGIN_S = 15.0
#: The worker's log line when it cut final steps off (with their count and the records dropped).
FINAL_STEPS_CUT_OFF = "final steps cut off at the finish timeout, their records left for redelivery"


async def warm_up(bootstrap: str, topics: Topics, partitions: int = 4) -> None:
    """One request per request partition answered and committed (conversation ``w<partition>``).

    The worker's producer then knows every output topic, and every partition has a committed
    offset, so what follows exercises the final step alone.
    """
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        placed = []
        for partition in range(partitions):
            key, value = request_record(f"w{partition}", f"w{partition}-1", "Hi.")
            sent = await producer.send(topics.requests, value, key=key, partition=partition)
            placed.append(await sent)
    finally:
        await producer.stop()
    deadline = time.monotonic() + 60
    while True:
        committed = await committed_offsets(bootstrap, topics.app_id, topics.requests)
        if all(committed.get(meta.partition, 0) > meta.offset for meta in placed):
            return
        assert time.monotonic() < deadline, (
            f"warm-up requests not committed within 60 s: {committed}"
        )
        await asyncio.sleep(0.2)


async def wait_for_exit(worker: WorkerProcess, timeout_s: float, after: str) -> int:
    """The worker's exit code; fail if it is still running ``timeout_s`` after ``after``."""
    assert worker.proc is not None
    try:
        return await asyncio.to_thread(worker.proc.wait, timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"worker still running {timeout_s} s after {after}:\n{worker.log_tail()}")


async def wait_for_log(worker: WorkerProcess, text: str, timeout_s: float) -> None:
    await wait_until(lambda: text in worker.log_path.read_text(errors="replace"), timeout_s, text)


def cut_off_lines(worker: WorkerProcess) -> list[dict[str, Any]]:
    """The worker's log lines about final steps it cut off."""
    return [r for r in worker.log_records() if r.get("event") == FINAL_STEPS_CUT_OFF]


async def streams_done_finals_retried(
    worker: WorkerProcess, simulator: SimulatorProcess, request_ids: Sequence[str]
) -> None:
    """Wait until every request's Vapi call completed and the producer retries a final."""

    def ready() -> bool:
        calls = calls_by_request(simulator)
        done = all(calls[r] and calls[r][0]["outcome"] == "completed" for r in request_ids)
        retried = "UnknownTopicOrPartition" in worker.log_path.read_text(errors="replace")
        return done and retried

    await wait_until(ready, 60, "every stream completed and a final response retried")


@pytest.mark.timeout(300)
async def test_sigterm_cuts_off_final_responses_kafka_will_not_take_within_the_bound(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, workers: Workers
) -> None:
    """SIGTERM while every final response hangs: the worker exits within its bound, acks none.

    The bound is WORKER_SHUTDOWN_GRACE_S + WORKER_FINISH_TIMEOUT_S (and the commit). Its producer
    drops what it held, so the next worker answers every request, each once.
    """
    grace, finish = 2.0, 2.0
    env = {"WORKER_SHUTDOWN_GRACE_S": str(grace), "WORKER_FINISH_TIMEOUT_S": str(finish)}
    stuck = await workers.start_ready("stuck", **env)
    await warm_up(kafka_bootstrap, topics)
    responses = UnwritableTopic(kafka_bootstrap, topics.responses)
    await responses.break_it()
    plan = Plan()
    for c in range(4):
        plan.add(f"f{c}", 1, paced("Answered, never delivered.", 4, 20))
    await plan.send(kafka_bootstrap, topics.requests)
    await streams_done_finals_retried(stuck, simulator, plan.request_ids)
    assert stuck.proc is not None
    stuck.proc.send_signal(signal.SIGTERM)
    exit_code = await wait_for_exit(stuck, grace + finish + EXIT_MARGIN_S, "SIGTERM")
    assert exit_code == 0, stuck.log_tail()
    (line,) = cut_off_lines(stuck)
    assert line["final_steps"] == 4, line
    assert line["records_dropped"] >= 1, line  # the first final; later ones wait for metadata
    committed = await committed_offsets(kafka_bootstrap, topics.app_id, topics.requests)
    for rid, (partition, offset) in plan.placed.items():
        assert committed.get(partition, 0) <= offset, (rid, plan.placed[rid], committed)

    await responses.fix_it()
    async with OutputReader(kafka_bootstrap, topics) as reader:
        await workers.start_ready("next", **env)
        await wait_all_answered(reader, plan, 60)
        await asyncio.sleep(2)
        await check_invariants("final-step-sigterm", plan, reader, simulator.calls(), runs=2)


@pytest.mark.timeout(300)
async def test_a_rebalance_cuts_off_final_responses_kafka_will_not_take_and_none_lands_later(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, workers: Workers
) -> None:
    """A worker joins while the owner's final responses hang: the owner lets go in time.

    Within WORKER_REBALANCE_GRACE_S + WORKER_FINISH_TIMEOUT_S the owner cuts the final steps off,
    drops what its producer holds and stops (non-zero, for a restart), long before the group
    would evict it. The joiner answers each request once, and the next turns continue from its
    answers. It writes its final responses to a topic of its own: a worker cannot start while a
    topic it needs cannot be created, as the owner's is. The owner's topic, once back, stays empty:
    nothing of the owner lands late.
    """
    grace, finish = 0.5, 2.0
    env = {"WORKER_REBALANCE_GRACE_S": str(grace), "WORKER_FINISH_TIMEOUT_S": str(finish)}
    owner = await workers.start_ready("owner", **env)
    await warm_up(kafka_bootstrap, topics)
    responses = UnwritableTopic(kafka_bootstrap, topics.responses)
    await responses.break_it()
    plan = Plan()
    for c in range(4):
        for turn in (1, 2):
            plan.add(f"g{c}", turn, paced(f"Turn {turn}.", 4, 20))
    first_turns = [f"g{c}-1" for c in range(4)]
    await plan.send(kafka_bootstrap, topics.requests, first_turns)
    await streams_done_finals_retried(owner, simulator, first_turns)
    joiner_topics = replace(topics, responses=f"{topics.responses}-joiner")
    joiner = workers.start("joiner", **env, TOPIC_RESPONSES=joiner_topics.responses)
    bound = grace + finish + EXIT_MARGIN_S
    try:
        await wait_until(lambda: bool(cut_off_lines(owner)), bound, "the owner letting go")
    except AssertionError:
        assert owner.proc is not None
        state = "still running" if owner.proc.poll() is None else "exited"
        pytest.fail(f"owner ({state}) still holds its requests {bound} s after a worker joined")
    await responses.fix_it()
    exit_code = await wait_for_exit(owner, EXIT_MARGIN_S, "cutting its final steps off")
    assert exit_code != 0, owner.log_tail()
    (line,) = cut_off_lines(owner)
    assert line["final_steps"] == 4, line
    assert line["records_dropped"] >= 1, line

    async with OutputReader(kafka_bootstrap, joiner_topics) as reader:
        await asyncio.to_thread(joiner.wait_ready, 120)
        await plan.send(kafka_bootstrap, topics.requests, [f"g{c}-2" for c in range(4)])
        await wait_all_answered(reader, plan, 60)
        await asyncio.sleep(2)
        await check_invariants("final-step-rebalance", plan, reader, simulator.calls(), runs=2)
    assert await read_topic(kafka_bootstrap, topics.responses) == []


@pytest.mark.timeout(300)
async def test_deltas_of_a_known_conversation_flow_after_an_output_topic_was_missing(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, workers: Workers
) -> None:
    """An output topic missing for a while does not stall the deltas of conversations seen before.

    A send that has to look a topic up makes the producer track that topic alone: from then on
    its metadata holds only the topics looked up so. A delta partition remembered from before
    must still be delivered: the next turn of that conversation is answered.
    """
    worker = await workers.start_ready("worker")
    await warm_up(kafka_bootstrap, topics)  # conversation "w0": its delta partition is remembered
    responses = UnwritableTopic(kafka_bootstrap, topics.responses)
    await responses.break_it()
    plan = Plan()
    x, y, w = plan.add("x", 1, "Hi."), plan.add("y", 1, "Hi."), plan.add("w0", 2, "Again.")
    await plan.send(kafka_bootstrap, topics.requests, [x])
    # x's final response is held and retried; the producer's metadata loses the topic.
    await streams_done_finals_retried(worker, simulator, [x])
    await plan.send(kafka_bootstrap, topics.requests, [y])
    await wait_for_log(worker, "not found in cluster metadata", 30)  # y's final looks it up
    await responses.fix_it()
    async with OutputReader(kafka_bootstrap, topics) as reader:
        await reader.wait_for_responses([x, y], 60)
        await plan.send(kafka_bootstrap, topics.requests, [w])
        await wait_all_answered(reader, plan, 30)
        assert reader.outputs.deltas_of(w)


# --- 7. no secret leaks ------------------------------------------------------------------------


@pytest.mark.timeout(300)
async def test_no_secret_setting_appears_in_any_output_even_around_a_401(
    kafka_bootstrap: str, unique_name: str, tmp_path: Path
) -> None:
    """A distinctive Vapi key and Kafka password, a simulated and a real 401, and an error text
    that echoes both back: no log line (JSON or console), record, header or metric shows them.

    The Kafka password is set although the broker speaks PLAINTEXT (the worker still holds it);
    it reaches the worker's path through Vapi's error text, as a secret echoed by any upstream
    would. One worker logs as JSON, the other in console format.
    """
    key = f"vapi-secret-{uuid.uuid4().hex}"
    wrong_key = f"vapi-wrong-{uuid.uuid4().hex}"
    password = f"sasl-secret-{uuid.uuid4().hex}"
    sim = SimulatorProcess(api_key=key).start()
    good_topics, bad_topics = Topics.unique(unique_name), Topics.unique(f"{unique_name}-401")
    env = {"LOG_LEVEL": "DEBUG", "KAFKA_SASL_PASSWORD": password}
    good = Workers(
        kafka_bootstrap, good_topics, sim, tmp_path, VAPI_API_KEY=key, LOG_FORMAT="console", **env
    )
    bad = Workers(kafka_bootstrap, bad_topics, sim, tmp_path, VAPI_API_KEY=wrong_key, **env)
    try:
        plan = Plan()
        for turn in (1, 2, 3):
            for conv in ("k0", "k1"):
                fault = " [[sim:fault status code=401]]" if (conv, turn) == ("k1", 2) else ""
                plan.add(conv, turn, paced(f"Turn {turn}.", 5, 10, extra=fault))
        echo = f' [[sim:fault status code=422 message="echo {password} {key}"]]'
        plan.add("k2", 1, paced("Echo.", 5, 10, extra=echo))
        # The second worker has a key the simulator does not know: a real 401 from the auth check.
        bad_plan = Plan()
        bad_plan.add("w0", 1, "Hello?")
        worker, rejected = good.start("good"), bad.start("bad")
        await asyncio.gather(*(asyncio.to_thread(w.wait_ready, 120) for w in (worker, rejected)))
        async with (
            OutputReader(kafka_bootstrap, good_topics) as reader,
            OutputReader(kafka_bootstrap, bad_topics) as bad_reader,
        ):
            await plan.send(kafka_bootstrap, good_topics.requests)
            await produce(kafka_bootstrap, good_topics.requests, [(b"k9", b"not json")])
            await bad_plan.send(kafka_bootstrap, bad_topics.requests)
            await wait_all_answered(reader, plan, 60)
            await reader.wait_for(lambda out: len(out.dlq) >= 1, 30, "one DLQ record")
            await bad_reader.wait_for_responses(bad_plan.request_ids, 60)
            await check_invariants(
                "secrets",
                plan,
                reader,
                sim.calls(),
                runs=1,
                expect_failed=frozenset({"k1-2", "k2-1"}),
            )
            failed = reader.outputs.responses_by_request()["k1-2"][0]
            assert failed["error"]["http_status"] == 401, failed
            echoed = reader.outputs.responses_by_request()["k2-1"][0]
            assert echoed["error"]["http_status"] == 422, echoed
            assert "echo" in echoed["error"]["message"], echoed
            response = bad_reader.outputs.responses[0]
            assert response["status"] == "failed"
            assert response["error"]["http_status"] == 401
        served = [w.metrics() for w in (worker, rejected)]
        served += [_get(f"http://127.0.0.1:{w.http_port}/readyz") for w in (worker, rejected)]
        assert worker.terminate() == 0
        assert rejected.terminate() == 0

        texts = await _everything_published(kafka_bootstrap, [good_topics, bad_topics])
        texts += served
        logs = [w.log_path.read_bytes().decode("utf-8", "replace") for w in good.started]
        logs += [w.log_path.read_bytes().decode("utf-8", "replace") for w in bad.started]
        # The console renderer's "[level] event"; a JSON line would have "event": "...".
        assert "] request failed" in logs[0], "the good worker logs in console format"
        texts += logs
        assert len(texts) > 10
        for secret in (key, wrong_key, password):
            for needle in (secret, secret[-16:]):
                leaks = [text[:200] for text in texts if needle in text]
                assert not leaks, f"{needle!r} leaked into {len(leaks)} outputs: {leaks[:3]}"
    finally:
        good.stop_all()
        bad.stop_all()
        sim.stop()


def _get(url: str) -> str:
    return httpx.get(url, timeout=5).text


async def _everything_published(bootstrap: str, all_topics: Sequence[Topics]) -> list[str]:
    """Keys, values and headers of every output and changelog record, as text."""
    texts: list[str] = []
    for topics in all_topics:
        for name in (topics.deltas, topics.responses, topics.dlq, topics.changelog()):
            for record in await read_topic(bootstrap, name):
                parts = [record.key or b"", record.value or b""]
                for header, value in record.headers:
                    parts += [header.encode(), value or b""]
                texts.append(b"\n".join(parts).decode("utf-8", "replace"))
    return texts
