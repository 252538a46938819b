"""Pure: whether a request is too old to start (``expires_at``, ``WORKER_REQUEST_MAX_AGE_S``).

Why: after an outage the request topic holds a backlog, and every request in it would be paid
for, though whoever asked may have stopped waiting long ago. A request may say until when its
reply is wanted (``expires_at``, RFC 3339 with an offset); the worker may bound the age of any
request by its record's timestamp (``WORKER_REQUEST_MAX_AGE_S``, 0 = no bound). A request that
would start after either ends ``expired``, with no Vapi call. Only the start is checked: a request
that started in time runs its retries to the end of its deadline.
"""

from __future__ import annotations

from datetime import UTC, datetime

from worker.errors import RequestExpiredError

__all__ = ["request_expiry"]


def request_expiry(
    *,
    now_s: float,
    expires_at: datetime | None,
    record_timestamp_s: float | None,
    max_age_s: float,
) -> RequestExpiredError | None:
    """Why the request may not start at ``now_s`` (wall clock, seconds), or None if it may.

    ``record_timestamp_s``: the request record's timestamp (None: unknown, the age is not
    bounded); ``max_age_s`` 0 turns the age bound off.
    """
    if expires_at is not None and now_s > expires_at.timestamp():
        late = now_s - expires_at.timestamp()
        return RequestExpiredError(
            f"the request expired at {expires_at.isoformat()} "
            f"({late:.3f} s before it could start); Vapi was not called"
        )
    if max_age_s > 0 and record_timestamp_s is not None:
        age = now_s - record_timestamp_s
        if age > max_age_s:
            produced = datetime.fromtimestamp(record_timestamp_s, UTC).isoformat()
            return RequestExpiredError(
                f"the request record (produced {produced}) was {age:.3f} s old when it could "
                f"start, over WORKER_REQUEST_MAX_AGE_S ({max_age_s:g} s); Vapi was not called"
            )
    return None
