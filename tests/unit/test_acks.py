"""DeltaAcks: every delta's publish latency observed once, at its ack, and the wait for all acks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from worker.acks import DeltaAcks


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _tracker() -> tuple[DeltaAcks, list[float], Clock]:
    observed: list[float] = []
    clock = Clock()
    return DeltaAcks(observed.append, clock), observed, clock


def _track(
    acks: DeltaAcks, count: int, make: Callable[[], asyncio.Future[object]] | None = None
) -> list[asyncio.Future[object]]:
    """``count`` unacknowledged sends, each received at 100.0, added to ``acks`` in order."""
    make = make or asyncio.get_running_loop().create_future
    futures = [make() for _ in range(count)]
    for fut in futures:
        acks.add(fut, received_at=100.0)
    return futures


async def _settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_each_delta_is_observed_once_at_its_batch_ack() -> None:
    acks, observed, clock = _tracker()
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in range(5)]
    for i, fut in enumerate(futures):
        acks.add(fut, received_at=100.0 + i)
    clock.now = 110.0
    for fut in futures[:3]:  # the first batch: three deltas acknowledged together
        fut.set_result(None)
    await _settle()
    assert observed == [10.0, 9.0, 8.0]
    clock.now = 120.0
    for fut in futures[3:]:
        fut.set_result(None)
    await _settle()
    assert observed == [10.0, 9.0, 8.0, 17.0, 16.0]
    assert len(acks) == 5


class CountingFuture(asyncio.Future[object]):
    callbacks_added = 0

    def add_done_callback(self, fn, *, context=None):  # type: ignore[no-untyped-def, override]
        CountingFuture.callbacks_added += 1
        super().add_done_callback(fn, context=context)


async def test_one_callback_per_batch_not_per_delta() -> None:
    acks, observed, _ = _tracker()
    CountingFuture.callbacks_added = 0
    futures = _track(acks, 100, CountingFuture)
    assert CountingFuture.callbacks_added == 1  # only the oldest unacknowledged one is watched
    for fut in futures[:60]:  # one batch
        fut.set_result(None)
    await _settle()
    assert len(observed) == 60
    assert CountingFuture.callbacks_added == 2  # then the next unacknowledged one
    for fut in futures[60:]:
        fut.set_result(None)
    await _settle()
    assert len(observed) == 100
    assert CountingFuture.callbacks_added == 2


async def test_an_ack_out_of_order_is_observed_with_the_ones_before_it() -> None:
    acks, observed, clock = _tracker()
    loop = asyncio.get_running_loop()
    first, second = loop.create_future(), loop.create_future()
    acks.add(first, received_at=100.0)
    acks.add(second, received_at=101.0)
    clock.now = 105.0
    second.set_result(None)
    await _settle()
    assert observed == []  # the first is still unacknowledged: nothing observed yet
    clock.now = 107.0
    first.set_result(None)
    await _settle()
    assert observed == [7.0, 6.0]


async def test_added_after_everything_was_acknowledged_is_watched_again() -> None:
    acks, observed, clock = _tracker()
    loop = asyncio.get_running_loop()
    early = loop.create_future()
    acks.add(early, received_at=100.0)
    early.set_result(None)
    await _settle()
    late = loop.create_future()
    acks.add(late, received_at=103.0)
    clock.now = 104.5
    late.set_result(None)
    await _settle()
    assert observed == [0.0, 1.5]


async def test_wait_returns_once_all_are_acknowledged() -> None:
    acks, _, _ = _tracker()
    futures = _track(acks, 3)
    waiter = asyncio.create_task(acks.wait())
    futures[0].set_result(None)
    futures[2].set_result(None)
    await _settle()
    assert not waiter.done()
    futures[1].set_result(None)
    await asyncio.wait_for(waiter, 1)


async def test_wait_watches_only_the_last_when_acks_come_in_order() -> None:
    acks, _, _ = _tracker()
    futures = _track(acks, 50, CountingFuture)
    CountingFuture.callbacks_added = 0
    waiter = asyncio.create_task(acks.wait())
    await _settle()
    assert CountingFuture.callbacks_added == 1  # the last one, not all fifty
    for fut in futures:
        fut.set_result(None)
    await asyncio.wait_for(waiter, 1)


async def test_wait_raises_the_first_failure_in_send_order_and_retrieves_all() -> None:
    acks, observed, _ = _tracker()
    futures = _track(acks, 4)
    futures[0].set_result(None)
    futures[3].set_exception(RuntimeError("second failure"))
    futures[1].set_exception(ValueError("first failure"))
    futures[2].set_result(None)
    with pytest.raises(ValueError, match="first failure"):
        await acks.wait()
    assert all(fut._log_traceback is False for fut in futures)  # type: ignore[attr-defined]
    await _settle()
    assert len(observed) == 4  # a failed send is observed too: it ended


async def test_awaitables_that_are_not_futures_are_awaited_not_observed() -> None:
    acks, observed, _ = _tracker()
    done: list[int] = []

    async def ack() -> None:
        done.append(1)

    acks.add(ack(), received_at=100.0)
    assert len(acks) == 1
    await acks.wait()
    assert done == [1]
    assert observed == []


async def test_wait_with_nothing_sent_returns_at_once() -> None:
    acks, _, _ = _tracker()
    await asyncio.wait_for(acks.wait(), 1)
