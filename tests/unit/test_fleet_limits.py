"""Fleet limits: shares by partition, AIMD after 429s, the requests-per-minute schedule, and the
glue that applies them (fake clock, no I/O)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from worker.aimd import AimdLimit
from worker.config import Settings
from worker.errors import ConfigError
from worker.fleet_limits import FleetLimits
from worker.fleet_shares import partition_quota, rate_share, stream_share
from worker.metrics import WorkerMetrics
from worker.request_rate import RequestRate

pytestmark = pytest.mark.unit


# --- shares -----------------------------------------------------------------------------------


@st.composite
def assignments(draw: st.DrawFn) -> tuple[int, list[set[int]]]:
    """A partition count and its partitions dealt out to 1..6 replicas (some may own none)."""
    partitions = draw(st.integers(1, 64))
    replicas = draw(st.integers(1, 6))
    owners = draw(st.lists(st.integers(0, replicas - 1), min_size=partitions, max_size=partitions))
    owned: list[set[int]] = [set() for _ in range(replicas)]
    for partition, owner in enumerate(owners):
        owned[owner].add(partition)
    return partitions, owned


@given(limit=st.integers(0, 1000), dealt=assignments())
def test_stream_shares_of_all_owners_add_up_to_the_limit(
    limit: int, dealt: tuple[int, list[set[int]]]
) -> None:
    partitions, owned = dealt
    assert sum(stream_share(limit, mine, partitions) for mine in owned) == limit


@given(limit=st.integers(0, 1000), dealt=assignments(), lost=st.integers(0, 63))
def test_stream_shares_never_exceed_the_limit_while_partitions_are_unowned(
    limit: int, dealt: tuple[int, list[set[int]]], lost: int
) -> None:
    partitions, owned = dealt
    for mine in owned:
        mine.discard(lost)
    assert sum(stream_share(limit, mine, partitions) for mine in owned) <= limit


@given(partitions=st.integers(1, 64), extra=st.integers(0, 500), partition=st.integers(0, 63))
def test_every_partition_gets_a_stream_when_the_limit_covers_the_partitions(
    partitions: int, extra: int, partition: int
) -> None:
    limit = partitions + extra
    quota = partition_quota(limit, partition % partitions, partitions)
    assert limit // partitions <= quota <= math.ceil(limit / partitions)
    assert quota >= 1


def test_twelve_streams_over_eight_partitions_owned_three_three_two() -> None:
    shares = [stream_share(12, owned, 8) for owned in ({0, 1, 2}, {3, 4, 5}, {6, 7})]
    assert shares == [4, 5, 3]
    assert [stream_share(12, set(range(i, 12, 3)), 12) for i in range(3)] == [4, 4, 4]
    assert stream_share(12, range(12), 12) == 12  # one replica left: the whole budget


def test_partitions_outside_the_topic_get_nothing() -> None:
    assert stream_share(12, {12, 13, -1}, 12) == 0
    assert rate_share(120, {5, 99}, 12) == 10
    with pytest.raises(ValueError, match="limit >= 0"):
        partition_quota(-1, 0, 4)
    with pytest.raises(ValueError, match="partitions >= 1"):
        rate_share(60, {0}, 0)


@given(per_minute=st.floats(0, 1e6), dealt=assignments())
def test_rate_shares_add_up_to_the_limit(
    per_minute: float, dealt: tuple[int, list[set[int]]]
) -> None:
    partitions, owned = dealt
    total = sum(rate_share(per_minute, mine, partitions) for mine in owned)
    assert total == pytest.approx(per_minute, rel=1e-9, abs=1e-9)


# --- AIMD -------------------------------------------------------------------------------------


def test_a_429_halves_the_limit_once_per_congestion_signal() -> None:
    aimd = AimdLimit(16)
    assert aimd.rate_limited(started_at=1.0, now=2.0, pause_s=0)
    assert aimd.limit == 8
    # Calls sent before the cut were sent under the old limit: their 429s change nothing.
    assert not aimd.rate_limited(started_at=1.5, now=2.1, pause_s=0)
    assert aimd.limit == 8
    assert aimd.rate_limited(started_at=2.0, now=3.0, pause_s=0)
    assert aimd.limit == 4
    for step in range(10):
        aimd.rate_limited(started_at=10.0 + step, now=10.0 + step, pause_s=0)
    assert aimd.limit == 1  # never below one


def test_successes_raise_the_limit_by_one_per_round_up_to_the_ceiling() -> None:
    aimd = AimdLimit(6)
    aimd.rate_limited(started_at=0, now=0, pause_s=0)
    assert aimd.limit == 3
    raised = [aimd.succeeded(now=1.0) for _ in range(3)]
    assert raised == [False, False, True]
    assert aimd.limit == 4
    for _ in range(4 + 5):
        aimd.succeeded(now=1.0)
    assert aimd.limit == 6
    assert not aimd.succeeded(now=1.0)
    assert aimd.limit == 6


def test_no_increase_until_the_retry_after_pause_is_over() -> None:
    aimd = AimdLimit(4)
    aimd.rate_limited(started_at=0, now=10.0, pause_s=5.0)
    assert aimd.limit == 2
    assert not any(aimd.succeeded(now=14.9) for _ in range(10))
    assert aimd.limit == 2
    assert [aimd.succeeded(now=15.0) for _ in range(2)] == [False, True]
    assert aimd.limit == 3


def test_a_new_ceiling_is_followed_at_the_ceiling_and_caps_a_cut_limit() -> None:
    aimd = AimdLimit(4)
    aimd.set_ceiling(12)
    assert aimd.limit == 12
    aimd.rate_limited(started_at=0, now=0, pause_s=0)
    assert aimd.limit == 6
    aimd.set_ceiling(8)
    assert aimd.limit == 6  # cut by a 429: stays
    aimd.set_ceiling(3)
    assert aimd.limit == 3
    aimd.set_ceiling(0)
    assert aimd.limit == 0
    with pytest.raises(ValueError, match="ceiling"):
        aimd.set_ceiling(-1)


@given(
    ceiling=st.integers(0, 300),
    events=st.lists(st.tuples(st.booleans(), st.floats(0, 5), st.integers(0, 300)), max_size=200),
)
def test_the_limit_stays_between_one_and_the_ceiling(
    ceiling: int, events: list[tuple[bool, float, int]]
) -> None:
    aimd = AimdLimit(ceiling)
    now = 0.0
    for limited, pause, new_ceiling in events:
        now += 0.5
        if limited:
            aimd.rate_limited(started_at=now - 1, now=now, pause_s=pause)
        elif new_ceiling % 7 == 0:
            aimd.set_ceiling(new_ceiling)
        else:
            aimd.succeeded(now=now)
        assert min(1, aimd.ceiling) <= aimd.limit <= aimd.ceiling


# --- requests per minute ----------------------------------------------------------------------


@given(
    per_minute=st.floats(1, 10_000),
    arrivals=st.lists(st.floats(0, 120), min_size=1, max_size=300),
    window=st.floats(0.1, 60),
)
def test_no_window_holds_more_than_one_call_over_the_rate(
    per_minute: float, arrivals: list[float], window: float
) -> None:
    rate = RequestRate(per_minute)
    starts = sorted(now + rate.reserve(now) for now in sorted(arrivals))
    for first in starts:
        inside = [s for s in starts if first <= s < first + window]
        assert len(inside) <= 1 + window * per_minute / 60 + 1e-9


def test_calls_are_spaced_and_an_idle_caller_goes_at_once() -> None:
    rate = RequestRate(120)  # one every 0.5 s
    assert [rate.reserve(10.0) for _ in range(3)] == [0.0, 0.5, 1.0]
    assert rate.reserve(100.0) == 0.0
    assert RequestRate(None).reserve(0.0) == 0.0
    assert RequestRate(0).reserve(0.0) == math.inf
    with pytest.raises(ValueError, match="per_minute"):
        RequestRate(-1)


# --- the glue ---------------------------------------------------------------------------------


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def limits(fake: FakeTime, metrics: WorkerMetrics, **settings: float) -> FleetLimits:
    values = {
        "local_max_in_flight": 256,
        "global_max_in_flight": 12,
        "global_requests_per_minute": 0,
        "retry_after_max_s": 60.0,
        **settings,
    }
    return FleetLimits(
        local_max_in_flight=int(values["local_max_in_flight"]),
        global_max_in_flight=int(values["global_max_in_flight"]),
        global_requests_per_minute=values["global_requests_per_minute"],
        retry_after_max_s=values["retry_after_max_s"],
        metrics=metrics,
        clock=fake.clock,
        sleep=fake.sleep,
    )


def gauge(metrics: WorkerMetrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(f"chat_worker_{name}")


def test_every_assignment_sets_the_share_and_the_applied_limit() -> None:
    fake, metrics = FakeTime(), WorkerMetrics(CollectorRegistry())
    fleet = limits(fake, metrics)
    applied: list[int] = []
    fleet.on_limit(applied.append)
    assert applied == [256]
    fleet.assign({0, 3, 6, 9}, 12)
    fleet.assign(set(range(12)), 12)
    assert applied == [256, 4, 12]
    assert gauge(metrics, "fleet_stream_share") == 12
    assert gauge(metrics, "concurrency_limit") == 12
    fleet.rate_limited(started_at=fake.now, retry_after_s=2.0)
    assert applied[-1] == 6
    for _ in range(6):
        fleet.succeeded()  # inside the Retry-After pause: no increase
    assert applied[-1] == 6
    fake.now += 2.0
    for _ in range(6):
        fleet.succeeded()
    assert applied[-1] == 7


def test_the_local_bound_caps_the_share_and_off_leaves_it_alone() -> None:
    fake, metrics = FakeTime(), WorkerMetrics(CollectorRegistry())
    fleet = limits(fake, metrics, local_max_in_flight=3)
    fleet.assign({0, 1, 2, 3, 4, 5}, 12)
    assert fleet.limit == 3
    off = limits(FakeTime(), WorkerMetrics(CollectorRegistry()), global_max_in_flight=0)
    off.assign({0}, 12)
    assert off.limit == 256


async def test_calls_wait_for_their_turn_in_the_requests_per_minute_share() -> None:
    fake, metrics = FakeTime(), WorkerMetrics(CollectorRegistry())
    fleet = limits(fake, metrics, global_requests_per_minute=120)
    fleet.assign({0, 1, 2, 3}, 12)  # a third of 120/min: one call every 1.5 s
    assert gauge(metrics, "fleet_requests_per_minute_share") == 40
    starts = [await fleet.before_call() for _ in range(3)]
    assert starts == [100.0, 101.5, 103.0]


async def test_a_worker_without_a_rate_share_waits_until_it_gets_one() -> None:
    fake, metrics = FakeTime(), WorkerMetrics(CollectorRegistry())
    fleet = limits(fake, metrics, global_requests_per_minute=60)
    fleet.assign(set(), 4)

    async def sleep(seconds: float) -> None:
        fake.now += seconds
        fleet.assign({0, 1, 2, 3}, 4)

    fleet._sleep = sleep  # the rebalance happens while the call waits
    assert await fleet.before_call() == 101.0


def test_a_global_stream_limit_below_the_partitions_is_refused() -> None:
    with pytest.raises(ConfigError, match="VAPI_GLOBAL_MAX_IN_FLIGHT"):
        Settings(vapi_global_max_in_flight=4, topic_partitions=8)
    assert Settings(vapi_global_max_in_flight=8, topic_partitions=8).vapi_global_max_in_flight == 8
    assert Settings(vapi_global_max_in_flight=0).vapi_global_max_in_flight == 0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("VAPI_GLOBAL_MAX_IN_FLIGHT", "-1"),
        ("VAPI_GLOBAL_MAX_IN_FLIGHT", "twelve"),
        ("VAPI_GLOBAL_REQUESTS_PER_MINUTE", "-5"),
        ("VAPI_GLOBAL_REQUESTS_PER_MINUTE", "inf"),
        ("VAPI_GLOBAL_REQUESTS_PER_MINUTE", "nan"),
    ],
)
def test_nonsense_limits_are_refused_by_name(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name.lower()):
        Settings()
