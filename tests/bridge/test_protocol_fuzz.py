"""handle_client_message under hypothesis: whatever a WebSocket client sends (random text,
JSON of any shape, wrong types, huge or deeply nested input, binary frames), the answer
is a reply that fits in a text frame and is small (`error`, or `pong`/`subscribed` for a
valid message), never an exception, and a refused message leaves the filter as it was."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from hypothesis import strategies as st

from bridge.fanout import ClientFilter
from bridge.mapping import JSON, dumps
from bridge.protocol import ACTIVITY_ONLY_TYPES, MESSAGE_TYPES, handle_client_message, in_force
from tests.support.fuzz import run_property, ws_messages, ws_texts

MAX_BYTES = 64 * 1024
NAMES = sorted(MESSAGE_TYPES | ACTIVITY_ONLY_TYPES)
NARROWED = ClientFilter(frozenset({"memory_update"}), None)
# The largest reply (an `error` listing the valid names and ten unknown ones): a client
# cannot make the bridge answer with more than this, whatever it sends.
MAX_REPLY_BYTES = 2048


def check_reply(reply: JSON, before: ClientFilter, after: ClientFilter) -> None:
    frame = dumps(reply).encode("utf-8")  # raises if it could not be sent as a text frame
    assert len(frame) <= MAX_REPLY_BYTES, len(frame)
    assert datetime.fromisoformat(reply["timestamp"]).utcoffset() == timedelta(0)
    kind = reply["type"]
    if kind == "error":
        assert isinstance(reply["error"], str) and reply["error"], reply
        assert after is before, "a refused message changes nothing"
    elif kind == "pong":
        assert set(reply) == {"type", "timestamp"} and after is before
    else:
        assert kind == "subscribed", reply
        assert reply["activity_types"] == in_force(after)
        assert set(reply["activity_types"]) <= set(NAMES)


def check_text(text: str, before: ClientFilter = NARROWED) -> JSON:
    reply, after = handle_client_message(text, None, before, MAX_BYTES)
    check_reply(reply, before, after)
    return reply


def test_any_text_frame_gets_a_small_reply_and_never_an_exception() -> None:
    run_property("WebSocket text message (sans-I/O)", ws_texts(MAX_BYTES), check_text, max_examples=1000)


def test_any_binary_frame_gets_an_error() -> None:
    def check(data: bytes) -> None:
        reply, after = handle_client_message(None, data, NARROWED, MAX_BYTES)
        check_reply(reply, NARROWED, after)
        assert reply["type"] == "error" and "binary" in reply["error"]

    run_property("WebSocket binary message (sans-I/O)", st.binary(max_size=4096), check, max_examples=200)


def test_the_filter_is_what_the_last_accepted_subscribe_asked_for() -> None:
    """Over any sequence of messages, refused ones never move the filter."""

    def check(sequence: list[str]) -> None:
        current = ClientFilter()
        expected = ClientFilter()
        for text in sequence:
            previous = current
            reply, current = handle_client_message(text, None, previous, MAX_BYTES)
            check_reply(reply, previous, current)
            if reply["type"] == "subscribed":
                _, expected = handle_client_message(text, None, ClientFilter(), MAX_BYTES)
            assert current == expected

    sequences = st.lists(st.builds(json.dumps, ws_messages()) | ws_texts(MAX_BYTES), max_size=8)
    run_property("WebSocket message sequence (sans-I/O)", sequences, check, max_examples=200)


def test_a_message_exactly_at_the_size_limit_is_read_and_one_byte_over_is_refused() -> None:
    head = '{"type":"ping","pad":"'
    at_limit = head + "x" * (MAX_BYTES - len(head) - 2) + '"}'
    assert len(at_limit.encode()) == MAX_BYTES
    assert check_text(at_limit)["type"] == "pong"
    over = head + "x" * (MAX_BYTES - len(head) - 1) + '"}'
    reply = check_text(over)
    assert reply["type"] == "error" and f"{MAX_BYTES + 1} bytes; the limit is {MAX_BYTES}" in reply["error"]
    # Counted in UTF-8 bytes, not characters: 2-byte characters reach the limit sooner.
    wide = head + "é" * ((MAX_BYTES - len(head)) // 2) + '"}'
    assert len(wide) < MAX_BYTES < len(wide.encode())
    assert check_text(wide)["type"] == "error"


def test_regressions_found_by_fuzzing() -> None:
    # json's decoder recursed past Python's limit: a RecursionError escaped and the
    # connection died. Now an error reply.
    assert "nested too deeply" in check_text("[" * 50_000)["error"]
    # A JSON escape decodes to a lone surrogate; echoed back raw, the reply could not be
    # encoded as UTF-8 and the connection died. Now escaped.
    reply = check_text(json.dumps({"type": "subscribe", "activity_types": ["\ud800", "bogus"]}))
    assert "'\\ud800'" in reply["error"] and "bogus" in reply["error"]
    assert "'\\udfff'" in check_text(json.dumps({"type": "\udfff"}))["error"]
