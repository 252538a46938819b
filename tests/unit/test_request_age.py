"""Unit tests for the rule that ends a too-old request before it calls Vapi."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from worker.request_age import request_expiry

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)


def _expiry(
    *,
    expires_at: datetime | None = None,
    record_age_s: float | None = None,
    max_age_s: float = 0,
) -> str | None:
    error = request_expiry(
        now_s=NOW.timestamp(),
        expires_at=expires_at,
        record_timestamp_s=None if record_age_s is None else NOW.timestamp() - record_age_s,
        max_age_s=max_age_s,
    )
    return None if error is None else str(error)


def test_a_request_without_bounds_never_expires() -> None:
    assert _expiry(record_age_s=10**9) is None


def test_expires_at_is_a_moment_in_any_offset() -> None:
    """Past (in another offset, same instant semantics): expired; at or before it: runs."""
    tokyo = timezone(timedelta(hours=9))
    assert _expiry(expires_at=NOW.astimezone(tokyo) + timedelta(seconds=1)) is None
    assert _expiry(expires_at=NOW) is None, "a request starting at its expiry still runs"
    message = _expiry(expires_at=NOW.astimezone(tokyo) - timedelta(seconds=2))
    assert message is not None
    assert "2026-11-30T17:59:58+09:00" in message
    assert "2.000 s before it could start" in message


def test_max_age_bounds_the_records_age_when_set() -> None:
    assert _expiry(record_age_s=61, max_age_s=60) is not None
    assert _expiry(record_age_s=60, max_age_s=60) is None
    assert _expiry(record_age_s=10**6, max_age_s=0) is None, "0 turns the bound off"
    assert _expiry(record_age_s=None, max_age_s=60) is None, "no timestamp, no bound"
    message = _expiry(record_age_s=90.5, max_age_s=60)
    assert message is not None
    assert "90.500 s old" in message
    assert "WORKER_REQUEST_MAX_AGE_S (60 s)" in message


def test_either_bound_is_enough() -> None:
    assert _expiry(expires_at=NOW + timedelta(hours=1), record_age_s=120, max_age_s=60)
    assert _expiry(expires_at=NOW - timedelta(hours=1), record_age_s=1, max_age_s=60)
