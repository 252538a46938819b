"""``send`` builds its record from the ``ChatRequest`` model, and refuses what the model refuses."""

from __future__ import annotations

import pytest

from worker import cli
from worker.console import new_request, request_headers
from worker.errors import ConfigError
from worker.messages import ChatRequest, decode_request

pytestmark = pytest.mark.unit


def test_the_record_send_produces_is_the_model_s_and_the_worker_reads_it_back() -> None:
    """Key, value and headers decode, as the worker decodes them, to the request that was built."""
    request = new_request(
        "c1",
        "hello",
        request_id="r1",
        assistant_id="a1",
        reset_context=True,
        metadata={"k": [1, "v"]},
    )
    assert request == ChatRequest(
        request_id="r1",
        conversation_id="c1",
        input="hello",
        assistant_id="a1",
        reset_context=True,
        metadata={"k": [1, "v"]},
    )
    decoded = decode_request(
        request.encode(),
        request.conversation_id.encode(),
        request_headers(),
        max_input_chars=100,
        max_metadata_bytes=100,
    )
    assert decoded == request
    assert dict(request_headers()) == {
        "content-type": b"application/json",
        "schema": ChatRequest.SCHEMA.encode(),
    }


def test_a_new_request_id_is_made_when_none_is_given() -> None:
    """Without ``request_id`` each request gets its own; empty options are left out."""
    first = new_request("c1", "hi", assistant_id="", metadata={})
    second = new_request("c1", "hi")
    assert first.request_id != second.request_id
    assert (first.assistant_id, first.metadata, first.reset_context) == (None, None, False)


@pytest.mark.parametrize(
    ("conversation", "request_id", "field"),
    [("", None, "conversation_id"), ("c1", "r" * 201, "request_id")],
)
def test_a_request_the_model_refuses_is_a_clear_error(
    conversation: str, request_id: str | None, field: str
) -> None:
    """An id the message contract refuses is a ConfigError naming the field, not a record."""
    with pytest.raises(ConfigError, match=field):
        new_request(conversation, "hi", request_id=request_id)


def test_vapi_worker_send_refuses_it_before_reaching_kafka(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``vapi-worker send --conversation ''`` exits 2 with the reason; no broker is needed."""
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")
    assert cli.main(["send", "--conversation", "", "hi"]) == 2
    assert "conversation_id" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["cancel", "--conversation", ""], "conversation_id"),
        (["cancel", "--conversation", "c1", "--request-id", ""], "request_id"),
    ],
)
def test_vapi_worker_cancel_refuses_a_bad_id_before_reaching_kafka(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    field: str,
) -> None:
    """``vapi-worker cancel`` with an id the contract refuses exits 2 naming the field."""
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert field in err
    assert "chat.cancel.v1" in err


def test_send_supersede_sets_the_field_the_worker_reads() -> None:
    request = new_request("c1", "hi", request_id="r1", supersede=True)
    decoded = decode_request(
        request.encode(), b"c1", request_headers(), max_input_chars=100, max_metadata_bytes=100
    )
    assert decoded.supersede is True
