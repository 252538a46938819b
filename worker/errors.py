"""The worker's exceptions, one tree, each class saying whether a retry may help.

    WorkerError
    ├── InvalidRequestError        a record on chat.requests cannot be read (goes to the DLQ)
    ├── ConfigError                settings that cannot work together (exit with a message)
    ├── ReplyTooLargeError         Vapi's reply outgrew MAX_REPLY_CHARS or a response record
    ├── RequestExpiredError        a request too old to start (``status: "expired"``, no call)
    ├── BudgetExceededError        the conversation spent its WORKER_CONVERSATION_BUDGET_USD
    ├── InternalError              anything unplanned in one request's path, a bug included
    ├── ProducerClosedError        Kafka did not take the outputs of a release in time (stop)
    ├── RecoveryStalledError       the table recovery made no progress for
    │                              WORKER_RECOVERY_STALL_S (the process exits)
    └── VapiError                  anything that went wrong talking to Vapi
        ├── VapiConnectError       no connection, or reset before a response       retryable
        ├── VapiTimeoutError       connect, first delta, stall, whole request      retryable
        ├── VapiStreamBrokenError  the stream ended abnormally after it started    retryable
        ├── VapiProtocolError      not Vapi's protocol (content type, undecodable,  not retryable
        │                          a status outside 100-599)
        └── VapiStatusError        a non-2xx status; retryable for 429 and 5xx
            ├── VapiAuthError        401/403: bad key; reported, not retried
            └── VapiRateLimitedError 429, with the server's Retry-After in seconds if given

Lower-level exceptions (httpx, json) are mapped to these at one boundary, ``worker.vapi.client``,
with ``raise ... from exc``, so nothing above it imports httpx.
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base of every error the worker raises on purpose."""

    code: str = "worker_error"
    retryable: bool = False


class InvalidRequestError(WorkerError):
    """A record on the request topic is not a valid ``ChatRequest``; ``reason`` says why."""

    code = "invalid_request"

    def __init__(self, reason: str, *, detail: str | None = None) -> None:
        super().__init__(reason if detail is None else f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ConfigError(WorkerError):
    """The settings cannot work; the CLI prints this and exits non-zero."""

    code = "config_error"


class ReplyTooLargeError(WorkerError):
    """The reply is longer than ``MAX_REPLY_CHARS``, or its response would not fit a record."""

    code = "reply_too_large"
    http_status: int | None = None


class RequestExpiredError(WorkerError):
    """A request would start after its ``expires_at``, or older than ``WORKER_REQUEST_MAX_AGE_S``.

    It ends with ``status: "expired"`` and no Vapi call; sending it again as it is cannot help.
    """

    code = "request_expired"
    http_status: int | None = None


class BudgetExceededError(WorkerError):
    """The conversation's spend reached ``WORKER_CONVERSATION_BUDGET_USD``: no more Vapi calls."""

    code = "budget_exceeded"
    http_status: int | None = None


class InternalError(WorkerError):
    """An exception nobody planned for ended one request (``worker.failures`` says which)."""

    code = "internal_error"


class ProducerClosedError(WorkerError):
    """A release dropped the outputs Kafka had not taken in time: the producer sends no more.

    Raised on a rebalance, where Faust crashes the app on it; the process exits for a restart.
    """

    code = "producer_closed"


class RecoveryStalledError(WorkerError):
    """The table recovery read nothing for WORKER_RECOVERY_STALL_S with records still to read.

    The app is crashed with it: the process exits non-zero, the consumer group hands its
    partitions to another worker, and the orchestrator restarts the process.
    """

    code = "recovery_stalled"


class VapiError(WorkerError):
    """Talking to Vapi failed."""

    code = "vapi_error"
    http_status: int | None = None


class VapiConnectError(VapiError):
    """No connection, or the connection was refused or reset before any response."""

    code = "vapi_connect_error"
    retryable = True


class VapiTimeoutError(VapiError):
    """A deadline passed: connect, first delta, gap between deltas (stall) or the whole request."""

    code = "vapi_timeout"
    retryable = True

    def __init__(self, message: str, *, phase: str) -> None:
        super().__init__(message)
        self.phase = phase


class VapiStreamBrokenError(VapiError):
    """The SSE stream broke off after it had started (disconnect mid-stream)."""

    code = "vapi_stream_broken"
    retryable = True


class VapiProtocolError(VapiError):
    """The response is not Vapi's protocol (content type, undecodable, status outside HTTP's)."""

    code = "vapi_protocol_error"


class VapiStatusError(VapiError):
    """Vapi answered with a non-2xx status."""

    code = "vapi_http_error"

    def __init__(self, message: str, *, http_status: int, body: str = "") -> None:
        super().__init__(message)
        self.http_status = http_status
        self.body = body
        self.retryable = http_status == 429 or http_status >= 500


class VapiAuthError(VapiStatusError):
    """401 or 403: the API key is wrong or lacks rights. Retrying cannot help."""

    code = "vapi_auth_error"


class VapiRateLimitedError(VapiStatusError):
    """429 Too Many Requests; ``retry_after_s`` is the server's hint, if any."""

    code = "vapi_rate_limited"

    def __init__(
        self, message: str, *, http_status: int = 429, body: str = "", retry_after_s: float | None
    ) -> None:
        super().__init__(message, http_status=http_status, body=body)
        self.retry_after_s = retry_after_s
