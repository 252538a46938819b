"""A table recovery that stops progressing ends the worker process; a slow one that progresses
does not (WORKER_RECOVERY_STALL_S).

While Faust recovers the table it keeps the request partitions paused and ``/healthz`` answers
200, so a recovery that no longer reads anything would hold those requests forever with nothing
to restart the process. The stall is made real: the worker's own broker is frozen (SIGSTOP of
its JVM) while the recovery reads a 40,000-conversation changelog, on 2 partitions of about 2 MB:
more than aiokafka fetches of a partition at once (1 MB), so the recovery needs the broker again
after the freeze. A smaller changelog is read whole before the freeze and recovers anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import (
    LocalBroker,
    OutputReader,
    SimulatorProcess,
    Topics,
    WorkerProcess,
    fill_changelog,
    parse_metrics,
    produce,
    request_record,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

PARTITIONS = 2
#: Enough values that no partition fits in one fetch (``max_partition_fetch_bytes``, 1 MB).
CONVERSATIONS = 40_000
#: Requests of new conversations produced before the recovery: they wait for it.
REQUESTS = 8
#: What Faust logs when it starts reading the changelog (after highwaters and offsets are known).
READING = "Restoring state from changelog topics"
STALL_EVENT = "table recovery stalled"
#: From the freeze to the stall error: the stall time (3 s) and a few looks, on a busy machine.
STALL_BOUND_S = 60.0
#: From the stall error to the process's exit: the crash's shutdown.
EXIT_BOUND_S = 60.0


@pytest.fixture(scope="module")
def broker() -> Iterator[LocalBroker]:
    """A broker of this module's own, which a test may freeze."""
    own = LocalBroker()
    own.begin_up()
    try:
        yield own
    finally:
        own.thaw()
        with contextlib.suppress(Exception):
            if own._up is not None and own._up.poll() is None:
                own._up.communicate(timeout=300)
        own.run("down")


@pytest.fixture(scope="module")
def bootstrap(broker: LocalBroker) -> str:
    return broker.bootstrap()


def _start(
    bootstrap: str,
    topics: Topics,
    simulator: SimulatorProcess,
    tmp_path: Path,
    name: str,
    stall_s: str,
) -> WorkerProcess:
    return WorkerProcess(
        bootstrap,
        topics,
        simulator,
        tmp_path,
        name=name,
        TOPIC_PARTITIONS=str(PARTITIONS),
        WORKER_RECOVERY_STALL_S=stall_s,
    ).start()


async def _wait_for_log(
    worker: WorkerProcess, text: str, timeout_s: float, *, running: bool = True
) -> None:
    """Wait for ``text`` in the worker's log; with ``running``, the worker must not exit first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert worker.proc is not None
        if text in worker.log_path.read_text(errors="replace"):
            return
        assert not running or worker.proc.poll() is None, worker.log_tail()
        await asyncio.sleep(0.02)
    pytest.fail(f"no {text!r} in the worker's log within {timeout_s} s:\n{worker.log_tail()}")


async def test_a_recovery_that_stops_reading_ends_the_process_with_an_error(
    broker: LocalBroker,
    bootstrap: str,
    simulator: SimulatorProcess,
    unique_name: str,
    tmp_path: Path,
) -> None:
    """The broker freezes while the recovery reads: the worker logs one stall error naming the
    changelog partitions with records left, and exits on its own with a non-zero code, having
    answered none of the requests waiting for the recovery; restarted, a worker recovers the
    table and answers them.

    The broker is thawed once the stall is logged, as a broker that answers all else is what the
    stalls seen had; with the broker frozen for good the exit waits for Faust's consumer stop
    (60 s) and aiokafka's LeaveGroup timeout on top."""
    topics = Topics.unique(unique_name)
    await fill_changelog(bootstrap, topics, PARTITIONS, CONVERSATIONS)
    worker = _start(bootstrap, topics, simulator, tmp_path, "stalled", "3")
    assert worker.proc is not None
    request_ids = [f"after-stall-{n}" for n in range(REQUESTS)]
    async with OutputReader(bootstrap, topics) as reader:
        try:
            # The topics exist once the ops endpoints are up; the requests wait for the recovery.
            await _wait_for_log(worker, "ops endpoints up", 120)
            await produce(
                bootstrap,
                topics.requests,
                [request_record(f"new-{n}", rid, "Hello.") for n, rid in enumerate(request_ids)],
            )
            await _wait_for_log(worker, READING, 180)
            broker.freeze()
            frozen_at = time.monotonic()
            await _wait_for_log(worker, STALL_EVENT, STALL_BOUND_S, running=False)
            stalled_after = time.monotonic() - frozen_at
            # The broker answers again, as it did in the stalls seen: only the recovery read
            # nothing.
            broker.thaw()
            try:
                code = await asyncio.to_thread(worker.proc.wait, EXIT_BOUND_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"still running {EXIT_BOUND_S} s after the stall:\n{worker.log_tail()}")
            exited_after = time.monotonic() - frozen_at
        finally:
            broker.thaw()
            worker.kill()
        answered_by_the_stalled_worker = len(reader.outputs.responses)
        # What the orchestrator does next: a worker (the restarted one) takes the partitions,
        # recovers them and answers the requests that waited.
        restarted = _start(bootstrap, topics, simulator, tmp_path, "restarted", "3")
        try:
            await asyncio.to_thread(restarted.wait_ready, 180)
            await reader.wait_for_responses(request_ids, 120)
            conversations = parse_metrics(restarted.metrics())["chat_worker_conversations"]
        finally:
            restarted.terminate()
    print(
        f"froze the broker; the stall was logged {stalled_after:.1f} s later and the worker "
        f"exited {exited_after:.1f} s after the freeze, with {code}"
    )

    assert code != 0, worker.log_tail()
    stalls = [r for r in worker.log_records() if STALL_EVENT in str(r.get("event", ""))]
    assert len(stalls) == 1, worker.log_tail()
    stall = stalls[0]
    assert stall["level"] == "error", stall
    assert "consumer group reassigns the partitions" in stall["event"], stall
    partitions = stall["partitions"]
    assert partitions, stall
    assert all(name.startswith(topics.changelog()) for name in partitions), stall
    assert stall["records_left"] > 0, stall
    assert stall["seconds_without_progress"] >= 3, stall
    assert answered_by_the_stalled_worker == 0
    assert conversations == CONVERSATIONS + REQUESTS
    assert not [r for r in restarted.log_records() if STALL_EVENT in str(r.get("event", ""))]


async def test_a_slow_recovery_that_progresses_does_not_trip(
    bootstrap: str,
    simulator: SimulatorProcess,
    unique_name: str,
    tmp_path: Path,
) -> None:
    """The same table recovered on a broker that answers, with a stall time shorter than the
    recovery: the worker becomes ready with every conversation, and counts no stall."""
    topics = Topics.unique(unique_name)
    await fill_changelog(bootstrap, topics, PARTITIONS, CONVERSATIONS)
    worker = _start(bootstrap, topics, simulator, tmp_path, "steady", "1")
    try:
        await _wait_for_log(worker, READING, 180)
        reading_at = time.monotonic()
        await asyncio.to_thread(worker.wait_ready, 180)
        recovered_after = time.monotonic() - reading_at
        metrics = parse_metrics(worker.metrics())
    finally:
        worker.terminate()
    print(f"the recovery read for {recovered_after:.1f} s")

    # Longer than WORKER_RECOVERY_STALL_S, or this would show nothing.
    assert recovered_after > 1.0
    assert metrics["chat_worker_conversations"] == CONVERSATIONS
    assert metrics["chat_worker_recovery_stalls_total"] == 0
    assert not [r for r in worker.log_records() if STALL_EVENT in str(r.get("event", ""))]
