"""When to call Vapi again: pure arithmetic, no clock, no sleeping, no I/O.

* ``RetryPolicy.delay_for`` — exponential backoff with full jitter (AWS Architecture Blog,
  "Exponential Backoff And Jitter"): the n-th retry waits ``uniform(0, min(max, base * 2**(n-1)))``,
  which spreads a crowd of failed calls evenly instead of letting them retry in lock-step. A 429's
  ``Retry-After`` is a floor on that delay. Errors that are not ``retryable`` are never retried.
* ``RetryPolicy.rate_limit_pause`` — how long a 429 pauses the whole worker: its ``Retry-After``,
  cut to ``retry_after_max_s``. The header is the server's (or any proxy's) word: ``1e20`` seconds
  or a date in the year 9999 would otherwise fail every request of the worker for good.
* ``parse_retry_after`` — ``Retry-After``: delay-seconds or an HTTP-date (RFC 9110 §10.2.3).
* ``SharedBackoff`` — one gate for the whole worker: when Vapi rate-limits one call, every call
  waits, so a burst of 429s slows everyone down instead of being retried by each stream separately.

The caller owns the clock and the deadline: it compares a returned delay with the time left for the
request, and sleeps.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Final

from worker.config import setting_default
from worker.errors import ConfigError, VapiError, VapiRateLimitedError

__all__ = ["RetryPolicy", "SharedBackoff", "parse_retry_after"]

# 2**62 times any sane base delay is far beyond any max delay; the cap keeps the float finite.
_MAX_EXPONENT: Final = 62
_DELAY_SECONDS: Final = re.compile(r"\d+(?:\.\d+)?")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently to retry a failed call; ``max_attempts`` counts the first.

    ``retry_after_max_s`` bounds what a 429's ``Retry-After`` can ask for.
    """

    max_attempts: int
    base_delay_s: float
    max_delay_s: float
    retry_after_max_s: float = setting_default("retry_after_max_s")

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError("max_attempts must be at least 1")
        if not 0 <= self.base_delay_s <= self.max_delay_s or not math.isfinite(self.max_delay_s):
            raise ConfigError("retry delays must satisfy 0 <= base_delay_s <= max_delay_s < inf")
        if not (0 < self.retry_after_max_s < math.inf):
            raise ConfigError("retry_after_max_s must be a positive number of seconds")

    def delay_for(self, attempt: int, error: VapiError, rng: random.Random) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, after ``attempt`` (from 1) failed.

        ``None`` means give up: the error is not retryable, or ``attempt`` was the last one allowed.
        A rate-limited error's ``rate_limit_pause`` is a floor and is not capped by ``max_delay_s``;
        whether it still fits in the request's deadline is the caller's decision.
        """
        if not error.retryable or attempt >= self.max_attempts:
            return None
        exponent = min(max(attempt - 1, 0), _MAX_EXPONENT)
        ceiling = min(self.max_delay_s, self.base_delay_s * 2.0**exponent)
        delay = rng.uniform(0.0, ceiling)
        pause = self.rate_limit_pause(error)
        if pause is not None:
            delay = max(delay, pause)
        return delay

    def rate_limit_pause(self, error: VapiError) -> float | None:
        """Seconds a 429 asks every call to wait, at most ``retry_after_max_s``; else ``None``."""
        if isinstance(error, VapiRateLimitedError) and error.retry_after_s is not None:
            return min(error.retry_after_s, self.retry_after_max_s)
        return None


def parse_retry_after(value: str, now: datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` header value; ``None`` if it cannot be read.

    Accepts delay-seconds (``"120"``, and leniently ``"1.5"``) and an HTTP-date, which is measured
    from ``now`` (naive datetimes are taken as UTC). A date in the past means 0.
    """
    text = value.strip()
    if _DELAY_SECONDS.fullmatch(text):
        seconds = float(text)
        return seconds if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    seconds = (_as_utc(when) - _as_utc(now)).total_seconds()
    return max(0.0, seconds)


def _as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


class SharedBackoff:
    """A worker-wide "nobody calls Vapi before t" gate, on the caller's monotonic clock.

    ``pause_until`` only ever moves the gate later (the latest deadline wins), so concurrent 429s
    with different hints cannot shorten each other's pause.
    """

    __slots__ = ("_deadline",)

    def __init__(self) -> None:
        self._deadline = -math.inf

    @property
    def deadline(self) -> float:
        """The monotonic time before which no call should start (``-inf`` when never paused)."""
        return self._deadline

    def pause_until(self, monotonic_deadline: float) -> None:
        """Hold every caller until ``monotonic_deadline``, unless already held longer."""
        if monotonic_deadline > self._deadline:
            self._deadline = monotonic_deadline

    def remaining(self, now: float) -> float:
        """Seconds a caller should still wait at monotonic time ``now`` (0 when open)."""
        return max(0.0, self._deadline - now)
