"""The recovery-stall rule (progress, not duration, is timed), and the loop that acts on it."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from worker.errors import RecoveryStalledError
from worker.kafka_adapters import RecoveryProgress
from worker.metrics import WorkerMetrics
from worker.recovery_watch import RecoveryWatch, Stall
from worker.runner import watch_recovery

pytestmark = pytest.mark.unit

TP0 = "chat-state-changelog[0]"
TP3 = "chat-state-changelog[3]"


def test_no_progress_for_stall_s_is_a_stall_naming_the_partitions_with_records_left() -> None:
    watch = RecoveryWatch(10)
    assert watch.observe(100.0, True, {TP0: 0, TP3: 500}, started=1) is None
    assert watch.observe(105.0, True, {TP0: 0, TP3: 500}, started=1) is None
    assert watch.observe(109.9, True, {TP0: 0, TP3: 500}, started=1) is None
    stall = watch.observe(110.0, True, {TP0: 0, TP3: 500}, started=1)
    assert stall == Stall(remaining={TP3: 500}, seconds=10.0)
    assert stall.total == 500


def test_it_keeps_reporting_while_the_stall_lasts() -> None:
    watch = RecoveryWatch(10)
    watch.observe(0.0, True, {TP3: 5})
    first = watch.observe(10.0, True, {TP3: 5})
    later = watch.observe(20.0, True, {TP3: 5})
    assert first is not None
    assert later is not None
    assert later.seconds == 20.0


def test_slow_but_steady_progress_never_trips() -> None:
    """A huge table read one record per look, over many times stall_s, is no stall."""
    watch = RecoveryWatch(10)
    remaining = 1_000_000
    for second in range(0, 10_000, 9):
        assert watch.observe(float(second), True, {TP0: remaining, TP3: remaining}) is None
        remaining -= 1


def test_a_new_recovery_resets_the_clock() -> None:
    watch = RecoveryWatch(10)
    watch.observe(0.0, True, {TP3: 5}, started=1.0)
    assert watch.observe(9.0, True, {TP3: 5}, started=1.0) is None
    # A rebalance started the recovery again: same partitions, same count, new start.
    assert watch.observe(12.0, True, {TP3: 5}, started=12.0) is None
    assert watch.observe(21.0, True, {TP3: 5}, started=12.0) is None
    assert watch.observe(22.0, True, {TP3: 5}, started=12.0) is not None


def test_leaving_recovery_resets_the_clock() -> None:
    watch = RecoveryWatch(10)
    watch.observe(0.0, True, {TP3: 5})
    assert watch.observe(9.0, True, {TP3: 5}) is None
    assert watch.observe(9.5, False, {TP3: 5}) is None
    assert watch.observe(10.0, True, {TP3: 5}) is None
    assert watch.observe(19.0, True, {TP3: 5}) is None
    assert watch.observe(20.0, True, {TP3: 5}) is not None


def test_out_of_recovery_nothing_is_timed() -> None:
    watch = RecoveryWatch(1)
    for second in range(100):
        assert watch.observe(float(second), False, {TP3: 5}) is None


def test_a_change_of_partitions_is_progress() -> None:
    watch = RecoveryWatch(10)
    watch.observe(0.0, True, {TP0: 5, TP3: 5})
    assert watch.observe(9.0, True, {TP0: 5, TP3: 5}) is None
    assert watch.observe(15.0, True, {TP3: 5}) is None  # TP0 was revoked
    assert watch.observe(24.0, True, {TP3: 5}) is None
    assert watch.observe(25.0, True, {TP3: 5}) is not None


def test_remaining_going_up_is_no_progress_and_then_going_down_is() -> None:
    watch = RecoveryWatch(10)
    watch.observe(0.0, True, {TP3: 100})
    assert watch.observe(5.0, True, {TP3: 200}) is None
    assert watch.observe(10.0, True, {TP3: 200}) is not None  # up was no progress
    assert watch.observe(11.0, True, {TP3: 150}) is None  # down: progress, though above 100
    assert watch.observe(20.0, True, {TP3: 150}) is None
    stall = watch.observe(21.0, True, {TP3: 150})
    assert stall is not None
    assert stall.seconds == 10.0


def test_nothing_left_to_read_but_still_in_recovery_does_not_trip() -> None:
    """Faust ends a recovery with nothing left on its own (and logs when it does not)."""
    watch = RecoveryWatch(10)
    for second in range(0, 100, 5):
        assert watch.observe(float(second), True, {TP0: 0, TP3: 0}) is None
    assert watch.observe(200.0, True, {}) is None


def test_zero_turns_it_off() -> None:
    watch = RecoveryWatch(0)
    assert not watch.enabled
    for second in range(0, 1000, 10):
        assert watch.observe(float(second), True, {TP3: 5}) is None


def test_a_negative_stall_s_is_refused() -> None:
    with pytest.raises(ValueError, match="stall_s"):
        RecoveryWatch(-1)


async def test_the_loop_logs_counts_and_crashes_once_on_a_stall(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``watch_recovery`` with a recovery that never reads: one error, one count, one crash."""
    metrics = WorkerMetrics(CollectorRegistry())
    crashes: list[BaseException] = []

    async def crash(exc: BaseException) -> None:
        crashes.append(exc)

    stuck = RecoveryProgress(in_recovery=True, remaining={TP0: 0, TP3: 7}, started_at=1.0)
    await asyncio.wait_for(
        watch_recovery(RecoveryWatch(0.05), lambda: stuck, metrics, crash), timeout=10
    )
    assert len(crashes) == 1
    assert isinstance(crashes[0], RecoveryStalledError)
    assert TP3 in str(crashes[0])
    assert TP0 not in str(crashes[0])
    assert metrics.recovery_stalls_total._value.get() == 1
    assert capsys.readouterr().out.count("table recovery stalled") == 1


async def test_the_loop_leaves_a_progressing_recovery_alone() -> None:
    metrics = WorkerMetrics(CollectorRegistry())
    left = iter(range(1_000_000, 0, -1))

    def reading() -> RecoveryProgress:
        return RecoveryProgress(in_recovery=True, remaining={TP3: next(left)}, started_at=1.0)

    async def crash(exc: BaseException) -> None:
        raise AssertionError(f"crashed: {exc}")

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(
            watch_recovery(RecoveryWatch(0.05), reading, metrics, crash), timeout=0.5
        )
    assert metrics.recovery_stalls_total._value.get() == 0


async def test_a_look_that_fails_does_not_end_the_watch() -> None:
    metrics = WorkerMetrics(CollectorRegistry())
    crashes: list[BaseException] = []
    looks = 0

    def flaky() -> RecoveryProgress:
        nonlocal looks
        looks += 1
        if looks <= 3:
            raise RuntimeError("not there yet")
        return RecoveryProgress(in_recovery=True, remaining={TP3: 7}, started_at=1.0)

    async def crash(exc: BaseException) -> None:
        crashes.append(exc)

    await asyncio.wait_for(watch_recovery(RecoveryWatch(0.05), flaky, metrics, crash), timeout=10)
    assert looks > 3
    assert len(crashes) == 1
