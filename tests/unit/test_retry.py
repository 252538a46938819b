"""Retry policy (full-jitter backoff), Retry-After parsing and the shared backoff gate."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
from worker.retry import RetryPolicy, SharedBackoff, parse_retry_after

pytestmark = pytest.mark.unit

POLICY = RetryPolicy(max_attempts=5, base_delay_s=0.5, max_delay_s=4.0)
NOW = datetime(2015, 10, 21, 7, 28, 0, tzinfo=UTC)

RETRYABLE: list[VapiError] = [
    VapiConnectError("refused"),
    VapiTimeoutError("slow", phase="stall"),
    VapiStreamBrokenError("cut"),
    VapiStatusError("boom", http_status=500),
    VapiStatusError("bad gateway", http_status=502),
    VapiRateLimitedError("slow down", retry_after_s=None),
]
FINAL: list[VapiError] = [
    VapiProtocolError("html"),
    VapiAuthError("who", http_status=401),
    VapiStatusError("bad request", http_status=400),
    VapiStatusError("not found", http_status=404),
]


# --- RetryPolicy -----------------------------------------------------------------------------


@pytest.mark.parametrize("error", RETRYABLE, ids=lambda e: type(e).__name__)
def test_retryable_errors_get_a_delay(error: VapiError) -> None:
    """Connect, timeout, broken-stream, 5xx and 429 errors are retried."""
    assert POLICY.delay_for(1, error, random.Random(1)) is not None


@pytest.mark.parametrize("error", FINAL, ids=lambda e: f"{type(e).__name__}-{e.http_status}")
def test_non_retryable_errors_give_up(error: VapiError) -> None:
    """Protocol errors, auth errors and other 4xx are never retried."""
    assert POLICY.delay_for(1, error, random.Random(1)) is None


def test_gives_up_after_max_attempts() -> None:
    """Attempt max_attempts is the last: after it fails there is no delay."""
    error = VapiConnectError("refused")
    assert POLICY.delay_for(4, error, random.Random(1)) is not None
    assert POLICY.delay_for(5, error, random.Random(1)) is None
    assert RetryPolicy(1, 0.5, 4.0).delay_for(1, error, random.Random(1)) is None


def test_ceiling_doubles_up_to_the_maximum() -> None:
    """The jitter range is base, 2*base, 4*base, ... capped at max_delay_s."""
    policy = RetryPolicy(max_attempts=100, base_delay_s=0.5, max_delay_s=4.0)
    error = VapiConnectError("refused")
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 4.0), (60, 4.0)]:
        delays = [policy.delay_for(attempt, error, random.Random(seed)) for seed in range(300)]
        assert all(d is not None and 0 <= d <= ceiling for d in delays)
        assert max(d for d in delays if d is not None) > ceiling * 0.9  # full jitter: whole range


def test_same_seed_same_delay() -> None:
    """Delays come only from the rng passed in, so a seeded rng reproduces them."""
    error = VapiConnectError("refused")
    first = [POLICY.delay_for(a, error, random.Random(7)) for a in range(1, 5)]
    again = [POLICY.delay_for(a, error, random.Random(7)) for a in range(1, 5)]
    assert first == again


def test_retry_after_is_a_floor() -> None:
    """A 429's Retry-After raises the delay to at least that many seconds, even beyond max."""
    error = VapiRateLimitedError("slow down", retry_after_s=30.0)
    assert POLICY.delay_for(1, error, random.Random(1)) == 30.0


@pytest.mark.parametrize("retry_after", [61.0, 1e20, float("inf")])
def test_retry_after_beyond_the_cap_waits_the_cap(retry_after: float) -> None:
    """An absurd Retry-After (1e20 s, a date decades ahead) is cut to ``retry_after_max_s``."""
    policy = RetryPolicy(max_attempts=5, base_delay_s=0.5, max_delay_s=4.0, retry_after_max_s=60)
    error = VapiRateLimitedError("slow down", retry_after_s=retry_after)
    assert policy.delay_for(1, error, random.Random(1)) == 60.0
    assert policy.rate_limit_pause(error) == 60.0


def test_rate_limit_pause_is_the_retry_after_within_the_cap() -> None:
    """The worker-wide pause is the 429's Retry-After; no pause without one, or for other errors."""
    policy = RetryPolicy(max_attempts=5, base_delay_s=0.5, max_delay_s=4.0, retry_after_max_s=60)
    assert policy.rate_limit_pause(VapiRateLimitedError("429", retry_after_s=7.5)) == 7.5
    assert policy.rate_limit_pause(VapiRateLimitedError("429", retry_after_s=None)) is None
    assert policy.rate_limit_pause(VapiStatusError("boom", http_status=503)) is None


def test_the_retry_after_cap_defaults_to_a_minute() -> None:
    """Without a cap given, a Retry-After is honoured up to 60 s."""
    assert POLICY.retry_after_max_s == 60.0


@pytest.mark.parametrize("cap", [0.0, -1.0, float("inf"), float("nan")])
def test_the_retry_after_cap_must_be_a_positive_number(cap: float) -> None:
    """A cap that is not a positive finite number is refused at construction."""
    with pytest.raises(ConfigError):
        RetryPolicy(5, 0.5, 4.0, retry_after_max_s=cap)


def test_small_retry_after_keeps_the_jittered_delay_when_larger() -> None:
    """A Retry-After shorter than the drawn delay does not shorten it."""
    error = VapiRateLimitedError("slow down", retry_after_s=0.0)
    plain = POLICY.delay_for(3, VapiConnectError("x"), random.Random(3))
    assert POLICY.delay_for(3, error, random.Random(3)) == plain


def test_huge_attempt_numbers_do_not_overflow() -> None:
    """Attempt numbers far beyond any exponent still give a delay within the cap."""
    policy = RetryPolicy(max_attempts=10**9, base_delay_s=1.0, max_delay_s=60.0)
    delay = policy.delay_for(10**6, VapiConnectError("x"), random.Random(0))
    assert delay is not None
    assert 0 <= delay <= 60.0


@pytest.mark.parametrize(
    ("max_attempts", "base", "maximum"), [(0, 0.5, 1.0), (3, 2.0, 1.0), (3, -1.0, 1.0)]
)
def test_impossible_policies_are_config_errors(
    max_attempts: int, base: float, maximum: float
) -> None:
    """A policy with no attempts or with base above max is refused at construction."""
    with pytest.raises(ConfigError):
        RetryPolicy(max_attempts, base, maximum)


@settings(max_examples=300, deadline=None)
@given(
    attempt=st.integers(1, 10_000),
    max_attempts=st.integers(1, 10_000),
    base=st.floats(0, 10),
    extra=st.floats(0, 100),
    retry_after=st.none() | st.floats(0, 1e30),
    retry_after_max=st.floats(0.001, 1e6),
    seed=st.integers(),
)
def test_delay_bounds(
    attempt: int,
    max_attempts: int,
    base: float,
    extra: float,
    retry_after: float | None,
    retry_after_max: float,
    seed: int,
) -> None:
    """Delays are None exactly past the last attempt, else within [floor, max(cap, floor)],
    the floor being the Retry-After cut to its own cap."""
    policy = RetryPolicy(max_attempts, base, base + extra, retry_after_max_s=retry_after_max)
    error = VapiRateLimitedError("429", retry_after_s=retry_after)
    delay = policy.delay_for(attempt, error, random.Random(seed))
    if attempt >= max_attempts:
        assert delay is None
        return
    floor = min(retry_after or 0.0, retry_after_max)
    cap = min(base + extra, base * 2.0 ** min(attempt - 1, 62))
    assert delay is not None
    assert floor <= delay <= max(cap, floor)


# --- parse_retry_after -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("0", 0.0),
        ("120", 120.0),
        (" 7 ", 7.0),
        ("1.5", 1.5),
        ("Wed, 21 Oct 2015 07:28:30 GMT", 30.0),
        ("Wed, 21 Oct 2015 07:30:00 GMT", 120.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),
        ("Wednesday, 21-Oct-15 07:28:10 GMT", 10.0),
        ("Wed Oct 21 07:28:05 2015", 5.0),
    ],
)
def test_parses_seconds_and_http_dates(value: str, seconds: float) -> None:
    """Delay-seconds are read as-is; an HTTP-date is measured from now, never negative."""
    assert parse_retry_after(value, NOW) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "soon", "-5", "1e3", "inf", "nan", "12 s", "9" * 400])
def test_unreadable_values_are_none(value: str) -> None:
    """Anything that is neither delay-seconds nor an HTTP-date gives None."""
    assert parse_retry_after(value, NOW) is None


def test_naive_and_offset_clocks_are_compared_in_utc() -> None:
    """A naive now is taken as UTC, and an aware now in another zone is converted."""
    naive = NOW.replace(tzinfo=None)
    paris = NOW.astimezone(timezone(timedelta(hours=2)))
    value = "Wed, 21 Oct 2015 07:28:30 GMT"
    assert parse_retry_after(value, naive) == pytest.approx(30.0)
    assert parse_retry_after(value, paris) == pytest.approx(30.0)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_any_header_value_parses_or_is_none(value: str) -> None:
    """Arbitrary header text never raises and never gives a negative or infinite delay."""
    seconds = parse_retry_after(value, NOW)
    assert seconds is None or 0 <= seconds < float("inf")


# --- SharedBackoff ---------------------------------------------------------------------------


def test_fresh_gate_is_open() -> None:
    """A gate nobody paused lets every caller through."""
    assert SharedBackoff().remaining(123.0) == 0.0


def test_pause_holds_until_the_deadline() -> None:
    """After pause_until(t), remaining counts down to zero at t."""
    gate = SharedBackoff()
    gate.pause_until(110.0)
    assert gate.remaining(100.0) == 10.0
    assert gate.remaining(110.0) == 0.0
    assert gate.remaining(500.0) == 0.0


def test_latest_deadline_wins() -> None:
    """A shorter pause never cuts a longer one short."""
    gate = SharedBackoff()
    gate.pause_until(120.0)
    gate.pause_until(105.0)
    assert gate.deadline == 120.0
    gate.pause_until(130.0)
    assert gate.remaining(100.0) == 30.0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1e9, 1e9), max_size=20), st.floats(-1e9, 1e9))
def test_remaining_reflects_the_maximum_deadline(deadlines: list[float], now: float) -> None:
    """Whatever the order of pauses, the wait is until the latest of them."""
    gate = SharedBackoff()
    for deadline in deadlines:
        gate.pause_until(deadline)
    expected = max(0.0, max(deadlines) - now) if deadlines else 0.0
    assert gate.remaining(now) == expected
