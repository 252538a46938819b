"""Logging: structlog for our code, the standard library's loggers rendered the same way.

One handler on the root logger renders every line, whether it came from ``structlog.get_logger()``
or from a library's ``logging.getLogger()`` (Faust's ``faust`` and ``mode``, ``aiokafka``): JSON
lines when the stream is not a terminal (or ``fmt="json"``), structlog's console renderer on one.
Request context (``request_id``, ``conversation_id``, ``attempt``) is bound by the pipeline with
``structlog.contextvars`` and merged into every line, the libraries' lines included.

Secrets never reach the output: a value registered with ``register_secret`` is replaced by
``***`` wherever it appears in a string, and any ``Bearer <token>`` is masked. The CLI registers
every ``SecretStr`` setting before the first line is logged. Values are masked before rendering
(JSON lines, exceptions included, are rendered from masked values); the console renderer formats
tracebacks itself, so its rendered text is masked once more.

Faust's worker (``mode.Worker``) replaces the root logger's handlers at start unless it is created
with ``override_logging=False``; the CLI configures logging here and starts Faust that way.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Final, Literal, TextIO

import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.types import EventDict, Processor, WrappedLogger

from worker.errors import ConfigError

LogFormat = Literal["auto", "json", "console"]

#: What a secret is replaced with.
MASK: Final = "***"

#: Library loggers routed through our handler (their own handlers are removed).
LIBRARY_LOGGERS: Final = ("faust", "mode", "aiokafka", "aiohttp", "httpx", "httpcore")

_HANDLER_NAME: Final = "worker.logs"
_BEARER = re.compile(r"(?i)\b(bearer)\s+[^\s\"',;]+")
_secrets: set[str] = set()
#: The secrets, longest first (a secret containing another is masked whole).
_secrets_longest_first: tuple[str, ...] = ()


def register_secret(value: str) -> None:
    """Have every later log line show ``***`` wherever ``value`` appears."""
    global _secrets_longest_first
    if value:
        _secrets.add(value)
        _secrets_longest_first = tuple(sorted(_secrets, key=len, reverse=True))


def redact(value: object) -> object:
    """``value`` with registered secrets and bearer tokens masked, inside containers too."""
    if isinstance(value, str):
        return _redact_text(value)
    if value is None or isinstance(value, int | float):
        # Most values of a line are numbers: they skip the costly ``Mapping`` (ABC) check.
        return value
    if isinstance(value, Mapping):
        return {key: redact(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact(item) for item in value]
    return value


def _redact_text(text: str) -> str:
    if text in _secrets:
        return MASK
    for secret in _secrets_longest_first:
        if secret in text:
            text = text.replace(secret, MASK)
    # Every line's every string passes here: run the regex only where it can match.
    if "bearer" not in text.lower():
        return text
    return _BEARER.sub(rf"\1 {MASK}", text)


def redact_secrets(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """A structlog processor: mask secrets in every value of the event."""
    return {key: redact(value) for key, value in event_dict.items()}


def configure_logging(
    level: str = "INFO", fmt: LogFormat = "auto", *, stream: TextIO | None = None
) -> None:
    """Route structlog and the standard library's logging to ``stream`` (stderr), one format.

    Raises ``ConfigError`` for a level name the logging module does not know. Calling it again
    replaces the previous configuration.
    """
    out = sys.stderr if stream is None else stream
    threshold = _level_number(level)
    pre_chain: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *pre_chain,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.stdlib.LoggerFactory(),
        # Not cached, so that tests can swap the configuration (structlog.testing.capture_logs).
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*pre_chain, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *_render_chain(json=_wants_json(fmt, out), colors=_isatty(out)),
        ],
    )
    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    _install(handler, threshold)
    # Python prints an uncaught exception's traceback itself, past every processor.
    sys.excepthook = _log_uncaught


def _install(handler: logging.Handler, threshold: int) -> None:
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(threshold)
    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        library.handlers.clear()
        library.propagate = True
        library.setLevel(logging.NOTSET)
    logging.captureWarnings(True)


def _log_uncaught(
    exc_type: type[BaseException], exc: BaseException, traceback: TracebackType | None
) -> None:
    """``sys.excepthook``: an uncaught exception becomes a log line, masked like every other."""
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, traceback)
        return
    logging.getLogger("worker").critical("uncaught exception", exc_info=(exc_type, exc, traceback))


def _render_chain(*, json: bool, colors: bool) -> list[Processor]:
    if json:
        return [
            structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False)),
            redact_secrets,
            structlog.processors.JSONRenderer(default=_json_default),
        ]
    # The console renderer formats exceptions itself, into the text it returns: that text is
    # masked after rendering. Plain tracebacks: no local variables, no colour codes that could
    # split a secret apart.
    renderer = structlog.dev.ConsoleRenderer(
        colors=colors, exception_formatter=structlog.dev.plain_traceback
    )
    return [redact_secrets, renderer, _redact_rendered]


def _redact_rendered(_logger: WrappedLogger, _method: str, rendered: Any) -> Any:
    """A processor after a renderer: mask secrets in the rendered line itself."""
    return _redact_text(rendered) if isinstance(rendered, str) else rendered


def _wants_json(fmt: LogFormat, stream: TextIO) -> bool:
    if fmt == "auto":
        return not _isatty(stream)
    return fmt == "json"


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _level_number(level: str) -> int:
    number = logging.getLevelNamesMapping().get(level.strip().upper())
    if number is None:
        raise ConfigError(f"unknown LOG_LEVEL {level!r}: use DEBUG, INFO, WARNING or ERROR")
    return number


def _json_default(value: Any) -> str:
    return _redact_text(repr(value))
