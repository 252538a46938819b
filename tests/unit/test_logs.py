"""Logging setup: JSON lines, context merging, secret redaction, library loggers rendered alike."""

from __future__ import annotations

import io
import json
import logging
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from pydantic import SecretStr
from structlog.testing import capture_logs

from worker import cli
from worker.config import Settings
from worker.errors import ConfigError
from worker.logs import MASK, configure_logging, redact, redact_secrets, register_secret

pytestmark = pytest.mark.unit


class TtyStream(io.StringIO):
    """A text stream that claims to be a terminal."""

    def isatty(self) -> bool:
        """Pretend to be a terminal."""
        return True


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Undo each test's logging configuration, so other tests see the defaults."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    """Every line written to ``stream``, each parsed as one JSON object."""
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_level_logger_timestamp_and_context() -> None:
    """In JSON format each line is one JSON object with the bound request context merged in."""
    out = io.StringIO()
    configure_logging("INFO", "json", stream=out)
    structlog.contextvars.bind_contextvars(request_id="r-1", conversation_id="c-1", attempt=2)
    structlog.get_logger("worker.pipeline").info("stream started", chat_id="chat-9")
    (line,) = lines(out)
    assert line["event"] == "stream started"
    assert line["level"] == "info"
    assert line["logger"] == "worker.pipeline"
    assert line["timestamp"].endswith("Z")
    assert (line["request_id"], line["conversation_id"], line["attempt"]) == ("r-1", "c-1", 2)
    assert line["chat_id"] == "chat-9"


def test_stdlib_library_loggers_come_out_as_json() -> None:
    """Lines from faust, mode and aiokafka loggers are rendered as the same JSON, args applied."""
    out = io.StringIO()
    configure_logging("INFO", "json", stream=out)
    structlog.contextvars.bind_contextvars(request_id="r-2")
    logging.getLogger("aiokafka.consumer.group_coordinator").warning("lag %d on %s", 5, "p0")
    logging.getLogger("faust.worker").info("ready")
    logging.getLogger("mode").error("stopping")
    parsed = lines(out)
    assert [p["logger"] for p in parsed] == [
        "aiokafka.consumer.group_coordinator",
        "faust.worker",
        "mode",
    ]
    assert parsed[0]["event"] == "lag 5 on p0"
    assert parsed[0]["level"] == "warning"
    assert parsed[0]["request_id"] == "r-2"


def test_library_handlers_are_replaced_by_propagation() -> None:
    """A handler a library installed on its own logger is removed, so lines are not doubled."""
    own = io.StringIO()
    logging.getLogger("faust").addHandler(logging.StreamHandler(own))
    out = io.StringIO()
    configure_logging("INFO", "json", stream=out)
    logging.getLogger("faust").info("once")
    assert own.getvalue() == ""
    assert [line["event"] for line in lines(out)] == ["once"]


def test_level_filters_structlog_and_stdlib_lines() -> None:
    """Below the configured level nothing is written, from either kind of logger."""
    out = io.StringIO()
    configure_logging("warning", "json", stream=out)
    structlog.get_logger("worker").info("quiet")
    logging.getLogger("aiokafka").info("quiet too")
    structlog.get_logger("worker").warning("loud")
    assert [line["event"] for line in lines(out)] == ["loud"]


def test_registered_secret_is_masked_in_values_and_messages() -> None:
    """A registered secret is replaced by *** as a whole value and inside longer strings."""
    out = io.StringIO()
    configure_logging("INFO", "json", stream=out)
    register_secret("sk-live-0123456789")
    structlog.get_logger("worker").info("calling", api_key="sk-live-0123456789")
    logging.getLogger("httpx").info("url was https://x/?key=%s", "sk-live-0123456789")
    first, second = lines(out)
    assert first["api_key"] == MASK
    assert second["event"] == f"url was https://x/?key={MASK}"
    assert "sk-live-0123456789" not in out.getvalue()


def test_bearer_tokens_are_masked_even_when_not_registered() -> None:
    """Any "Bearer <token>" substring is masked, whatever its case."""
    out = io.StringIO()
    configure_logging("INFO", "json", stream=out)
    structlog.get_logger("worker").info("headers", auth="Authorization: bearer abc.DEF-123")
    (line,) = lines(out)
    assert line["auth"] == f"Authorization: bearer {MASK}"


def test_redaction_reaches_nested_values_and_exceptions() -> None:
    """Secrets inside nested containers and in a logged exception's message are masked."""
    register_secret("nested-secret-42")
    assert redact({"a": ["x", {"b": "nested-secret-42"}], "n": 3}) == {
        "a": ["x", {"b": MASK}],
        "n": 3,
    }
    out = io.StringIO()
    configure_logging("INFO", "json", stream=out)
    try:
        raise RuntimeError("refused key nested-secret-42")
    except RuntimeError:
        structlog.get_logger("worker").exception("call failed")
    (line,) = lines(out)
    assert line["exception"][0]["exc_value"] == f"refused key {MASK}"
    assert "nested-secret-42" not in out.getvalue()


@pytest.mark.parametrize("stream", [io.StringIO, TtyStream], ids=["plain", "colors"])
def test_console_tracebacks_are_redacted(stream: type[io.StringIO]) -> None:
    """In console format a traceback is rendered as text: secrets are masked there too."""
    out = stream()
    configure_logging("INFO", "console", stream=out)
    register_secret("console-secret-91")
    try:
        raise RuntimeError("refused console-secret-91 and Bearer tok-123")
    except RuntimeError:
        structlog.get_logger("worker.app").exception("request crashed")
        logging.getLogger("aiokafka").exception("library line")
    text = out.getvalue()
    assert "RuntimeError: refused" in text
    assert text.count("Traceback (most recent call last)") == 2
    assert "console-secret-91" not in text
    assert "tok-123" not in text


def test_an_uncaught_exception_is_logged_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Python's own traceback printing goes through the same renderer and masking."""
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    out = io.StringIO()
    configure_logging("INFO", "console", stream=out)
    register_secret("uncaught-secret-33")
    try:
        raise RuntimeError("startup refused uncaught-secret-33")
    except RuntimeError as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    text = out.getvalue()
    assert "uncaught exception" in text
    assert "RuntimeError: startup refused ***" in text
    assert "uncaught-secret-33" not in text


def test_every_secret_setting_is_registered_by_the_entry_point(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each SecretStr setting given in the environment is masked once the CLI has read them."""
    secrets = {
        "KAFKA_SASL_PASSWORD": "sasl-secret-5150",
        "VAPI_API_KEY": "vapi-secret-5150",
        "SIMULATOR_API_KEY": "sim-secret-5150",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LOG_FORMAT", "json")
    seen: list[Settings] = []
    monkeypatch.setattr(cli, "_dispatch", lambda _args, settings: seen.append(settings) or 0)
    assert cli.main(["tail"]) == 0
    fields = [name for name, value in vars(seen[0]).items() if isinstance(value, SecretStr)]
    assert sorted(fields) == sorted(name.lower() for name in secrets), "a SecretStr field untested"
    for value in secrets.values():
        assert redact(f"x {value} y") == f"x {MASK} y"


def test_redact_secrets_is_a_plain_processor() -> None:
    """The processor can be used on its own, e.g. with structlog's capture helpers."""
    register_secret("proc-secret-7")
    event = redact_secrets(None, "info", {"event": "x", "key": "proc-secret-7"})
    assert event == {"event": "x", "key": MASK}


def test_auto_format_is_json_off_a_terminal_and_console_on_one() -> None:
    """fmt="auto" writes JSON to a plain stream and human-readable text to a terminal."""
    plain = io.StringIO()
    configure_logging("INFO", "auto", stream=plain)
    structlog.get_logger("worker").info("to a pipe")
    assert lines(plain)[0]["event"] == "to a pipe"

    tty = TtyStream()
    configure_logging("INFO", "auto", stream=tty)
    structlog.get_logger("worker").info("to a terminal", n=1)
    text = tty.getvalue()
    assert "to a terminal" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_console_format_forced_on_a_pipe() -> None:
    """fmt="console" renders text even when the stream is not a terminal."""
    out = io.StringIO()
    configure_logging("DEBUG", "console", stream=out)
    logging.getLogger("faust").debug("hello from faust")
    assert "hello from faust" in out.getvalue()
    assert not out.getvalue().lstrip().startswith("{")


def test_reconfiguring_replaces_the_previous_handler() -> None:
    """Calling configure_logging twice leaves one handler: lines are not written twice."""
    first, second = io.StringIO(), io.StringIO()
    configure_logging("INFO", "json", stream=first)
    configure_logging("INFO", "json", stream=second)
    structlog.get_logger("worker").info("once")
    assert first.getvalue() == ""
    assert len(lines(second)) == 1


def test_warnings_are_logged() -> None:
    """Python warnings are routed into the log as the py.warnings logger."""
    out = io.StringIO()
    configure_logging("INFO", "json", stream=out)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        logging.captureWarnings(True)
        warnings.warn("deprecated thing", UserWarning, stacklevel=1)
    (line,) = lines(out)
    assert line["logger"] == "py.warnings"
    assert "deprecated thing" in line["event"]


def test_unknown_level_is_a_config_error() -> None:
    """A level name the logging module does not know raises ConfigError."""
    with pytest.raises(ConfigError, match="LOG_LEVEL"):
        configure_logging("LOUD", "json", stream=io.StringIO())


def test_capture_logs_still_works_after_configuration() -> None:
    """structlog's capture_logs helper sees events after configure_logging (no logger caching)."""
    configure_logging("INFO", "json", stream=io.StringIO())
    log = structlog.get_logger("worker")
    with capture_logs() as captured:
        log.info("captured", k=1)
    assert captured == [{"event": "captured", "k": 1, "log_level": "info"}]
