"""A finished request is never sent to Vapi again, however far behind the commit it finished.

One request partition. The first turn of conversation Y streams slowly and holds the partition's
commit; 100 turns of conversation X finish behind it, so their records stay uncommitted. A second
worker joins the group: the rebalance revokes the partition, Y's stream is cut, and the
partition's owner gets Y's turn and all 100 of X's again, from the committed offset. X keeps more
turns than the request-id window (``WORKER_COMPLETED_IDS_KEPT``) remembers; each of them must
still be recognised as finished: one Vapi call and one final response per turn, and X's chain
of chat ids unbroken.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import (
    OutputReader,
    SimulatorProcess,
    Topics,
    Workers,
    calls_by_request,
    committed_offsets,
    paced,
    parse_metrics,
    produce,
    request_record,
    wait_committed_past,
    wait_until,
)

pytestmark = pytest.mark.e2e

TURNS = 100
#: The request-id window, smaller than ``TURNS``: alone, it cannot recognise X's oldest turns.
IDS_KEPT = 64
SLOW = "y-1"


@pytest.fixture
def workers(
    kafka_bootstrap: str, topics: Topics, simulator: SimulatorProcess, tmp_path: Path
) -> Iterator[Workers]:
    group = Workers(
        kafka_bootstrap,
        topics,
        simulator,
        tmp_path,
        TOPIC_PARTITIONS="1",
        WORKER_COMPLETED_IDS_KEPT=str(IDS_KEPT),
        WORKER_REBALANCE_GRACE_S="0.5",
        VAPI_STALL_TIMEOUT_S="90",
    )
    yield group
    group.stop_all()


@pytest.mark.timeout(180)
async def test_turns_finished_far_behind_a_slow_stream_are_not_sent_again_after_a_rebalance(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, workers: Workers
) -> None:
    """100 turns finished behind an uncommitted slow stream: 0 repeated calls after a rebalance."""
    # Y's first call stalls for a minute (its call after the rebalance does not): the commit of
    # the one partition stays at Y's offset while X's turns finish behind it.
    stall = "[[sim:fault stall after=2 seconds=60 times=1]]"
    turns = [f"x-{n}" for n in range(1, TURNS + 1)]
    await workers.start_ready("first")
    async with OutputReader(kafka_bootstrap, topics) as reader:
        (slow,) = await produce(
            kafka_bootstrap,
            topics.requests,
            [request_record("y", SLOW, paced("Take your time.", 6, 20, extra=stall))],
        )
        await wait_until(
            lambda: any(c["deltas_sent"] >= 2 for c in calls_by_request(simulator)[SLOW]),
            60,
            "the slow stream of y",
        )
        placed = await produce(
            kafka_bootstrap,
            topics.requests,
            [request_record("x", rid, paced(f"Turn {rid}.", 3, 0, first_ms=0)) for rid in turns],
        )
        await reader.wait_for_responses(turns, 60)
        committed = await committed_offsets(kafka_bootstrap, topics.app_id, topics.requests)
        assert committed.get(0, 0) <= slow.offset, f"committed past the slow stream: {committed}"
        slow_call = calls_by_request(simulator)[SLOW][0]
        assert slow_call["ended_at"] is None, "the slow stream ended early"

        await workers.start_ready("second")
        await reader.wait_for_responses([SLOW], 90)
        await wait_committed_past(kafka_bootstrap, topics, {0: max(m.offset for m in placed)})
        await asyncio.sleep(1)  # room for a late duplicate response to show up
        calls = calls_by_request(simulator)
        finals = Counter(r["request_id"] for r in reader.outputs.responses)

    # The rebalance really redelivered the partition from y's offset: y's turn ran twice.
    assert len(calls[SLOW]) == 2, calls[SLOW]
    assert finals[SLOW] == 1
    # ... and with it every turn of x, each recognised as finished instead of sent again.
    skipped = sum(
        parse_metrics(w.metrics()).get('chat_worker_requests_total{outcome="duplicate"}', 0.0)
        for w in workers.started
    )
    repeated = {rid: len(calls[rid]) for rid in turns if len(calls[rid]) != 1}
    assert not repeated, f"{len(repeated)} turns of x reached Vapi more than once: {repeated}"
    duplicates = {rid: finals[rid] for rid in turns if finals[rid] != 1}
    assert not duplicates, f"{len(duplicates)} turns of x have other than one final: {duplicates}"
    assert skipped >= TURNS, f"only {skipped} redelivered records recognised as finished"
    previous = None
    for rid in turns:
        (call,) = calls[rid]
        assert call["outcome"] == "completed", call
        assert call["previous_chat_id"] == previous, f"{rid} continued from the wrong chat"
        previous = call["chat_id"]
    for worker in workers.started:
        assert worker.proc is not None
        assert worker.proc.poll() is None, worker.log_tail()
