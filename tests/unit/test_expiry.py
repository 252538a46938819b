"""The expiry rule: which conversations may be deleted, and how often the sweep looks."""

from __future__ import annotations

import pytest

from worker.expiry import is_expired, sweep_interval_s

pytestmark = pytest.mark.unit

NOW = 1_800_000_000_000  # ms
TTL = 7 * 24 * 3600 * 1000


def test_a_conversation_idle_for_the_ttl_expires() -> None:
    assert is_expired(NOW - TTL, now_ms=NOW, ttl_ms=TTL, pending=False)
    assert is_expired(NOW - TTL - 1, now_ms=NOW, ttl_ms=TTL, pending=False)


def test_a_conversation_active_within_the_ttl_stays() -> None:
    assert not is_expired(NOW - TTL + 1, now_ms=NOW, ttl_ms=TTL, pending=False)
    assert not is_expired(NOW, now_ms=NOW, ttl_ms=TTL, pending=False)


def test_a_conversation_with_a_record_taken_and_unfinished_never_expires() -> None:
    """The race: a new turn was taken (running or waiting in the scheduler) while the
    conversation sat idle past the TTL; deleting it now would cut that turn's context."""
    assert not is_expired(NOW - 10 * TTL, now_ms=NOW, ttl_ms=TTL, pending=True)
    assert not is_expired(None, now_ms=NOW, ttl_ms=TTL, pending=True)


def test_a_time_ahead_of_this_clock_keeps_the_conversation() -> None:
    """Another worker's clock ran ahead: the conversation counts as active until then."""
    assert not is_expired(NOW + 3_600_000, now_ms=NOW, ttl_ms=TTL, pending=False)


def test_a_value_that_is_no_conversation_may_go_when_nothing_is_pending() -> None:
    """It reads as a fresh conversation anyway: deleting it loses nothing."""
    assert is_expired(None, now_ms=NOW, ttl_ms=TTL, pending=False)


@pytest.mark.parametrize(
    ("ttl_s", "interval_s"),
    [(2.0, 1.0), (10.0, 1.0), (60.0, 6.0), (3600.0, 360.0), (30 * 86400.0, 600.0)],
)
def test_the_sweep_runs_every_tenth_of_the_ttl_between_1_s_and_10_minutes(
    ttl_s: float, interval_s: float
) -> None:
    assert sweep_interval_s(ttl_s) == interval_s
