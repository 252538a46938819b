"""Pure: Kafka's record size limit, and how the worker keeps every output record within it.

The producer refuses a record over its ``max_request_size`` (``record_bytes`` is the estimate it
compares), and a record that skips that check is refused by the broker with the whole batch it
travels in. So no output may be allowed to outgrow a record:

* delta text is cut into pieces of at most ``MAX_DELTA_TEXT_BYTES`` as JSON (``split_text``), far
  below any record limit, so a delta record stays small whatever one SSE event held;
* a dead letter keeps its record's leading value bytes and says so (``fit_dead_letter``);
* the final response's text is bounded by ``MAX_REPLY_CHARS`` and its record measured before it is
  sent (``worker.pipeline``).

Pieces are cut between code points. A Python ``str`` holds a character as one code point (a
character outside the BMP too, which JSON writes as a surrogate pair), so no UTF-8 sequence and no
surrogate pair is ever cut in half; lone surrogates never reach here (the SSE parser refuses them).
"""

from __future__ import annotations

from typing import Final

import pydantic_core
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from worker.messages import DLQ_HEADER_PREFIX, RecordHeaders

__all__ = [
    "DLQ_HEADERS_DROPPED_HEADER",
    "DLQ_TRUNCATED_HEADER",
    "MAX_DELTA_TEXT_BYTES",
    "MAX_JSON_BYTES_PER_CHAR",
    "SAFE_DELTA_CHARS",
    "fit_dead_letter",
    "json_text_bytes",
    "record_bytes",
    "split_text",
]

#: Most bytes one character takes in JSON: a control character is written ``\u0001``.
MAX_JSON_BYTES_PER_CHAR: Final = 6
#: Most bytes of JSON string one delta's text may take (the rest of a delta is ids and a time).
MAX_DELTA_TEXT_BYTES: Final = 65_536
#: Text of at most this many characters fits one delta whatever the characters: never measured.
SAFE_DELTA_CHARS: Final = MAX_DELTA_TEXT_BYTES // MAX_JSON_BYTES_PER_CHAR

#: On a dead letter cut to fit: the original value's size in bytes.
DLQ_TRUNCATED_HEADER: Final = f"{DLQ_HEADER_PREFIX}truncated"
#: On a dead letter whose original headers were dropped to fit: how many there were.
DLQ_HEADERS_DROPPED_HEADER: Final = f"{DLQ_HEADER_PREFIX}headers-dropped"


def json_text_bytes(text: str) -> int:
    """Bytes ``text`` takes inside a JSON string as the messages serialize it (quotes excluded)."""
    return len(pydantic_core.to_json(text)) - 2


def split_text(text: str, max_bytes: int) -> list[str]:
    """Cut ``text`` into consecutive pieces of at most ``max_bytes`` each as JSON.

    Text that fits stays one piece. Longer text is cut every ``max_bytes // 6`` characters, which
    fits whatever the characters are (a piece of ASCII is then smaller than it could be: a piece
    of text this long is rare, and a simple bound is one that is easy to trust).
    """
    if max_bytes < MAX_JSON_BYTES_PER_CHAR:
        raise ValueError(f"max_bytes must hold one character ({MAX_JSON_BYTES_PER_CHAR} bytes)")
    if len(text) * MAX_JSON_BYTES_PER_CHAR <= max_bytes or json_text_bytes(text) <= max_bytes:
        return [text]
    step = max_bytes // MAX_JSON_BYTES_PER_CHAR
    return [text[start : start + step] for start in range(0, len(text), step)]


def record_bytes(key: bytes | None, value: bytes | None, headers: RecordHeaders) -> int:
    """The size aiokafka's ``send`` compares with ``max_request_size`` (one record's batch)."""
    return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, list(headers)))


def fit_dead_letter(
    key: bytes | None, value: bytes | None, headers: RecordHeaders, *, max_bytes: int
) -> tuple[bytes | None, bytes | None, RecordHeaders]:
    """The dead letter of a record, cut to at most ``max_bytes`` when it is larger.

    A record that fits is returned as it is. Otherwise ``dlq-truncated`` (the value's size) is
    added and the value cut to its leading bytes. If the key and headers alone are still too
    large, the original headers are dropped as well (``dlq-headers-dropped`` says how many; the
    ``dlq-*`` headers stay), and last the key is cut. ``max_bytes`` must hold the ``dlq-*``
    headers.
    """
    if record_bytes(key, value, headers) <= max_bytes:
        return key, value, headers
    headers = [*headers, (DLQ_TRUNCATED_HEADER, str(len(value or b"")).encode())]
    value = _cut(value, record_bytes(key, value, headers) - max_bytes)
    over = record_bytes(key, value, headers) - max_bytes
    if over > 0:
        ours = [header for header in headers if header[0].lower().startswith(DLQ_HEADER_PREFIX)]
        dropped = str(len(headers) - len(ours)).encode()
        headers = [*ours, (DLQ_HEADERS_DROPPED_HEADER, dropped)]
        key = _cut(key, record_bytes(key, value, headers) - max_bytes)
    return key, value, headers


def _cut(data: bytes | None, over: int) -> bytes | None:
    """``data`` without its last ``over`` bytes (the record's size falls at least as much)."""
    if data is None or over <= 0:
        return data
    return data[: max(0, len(data) - over)]
