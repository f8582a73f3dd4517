"""handle_client_message: the replies to `ping` and `subscribe`, the filter they leave in
force, and the `error` reply (with the filter unchanged) for anything malformed."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from bridge.fanout import ClientFilter, Frame
from bridge.mapping import JSON
from bridge.protocol import ACTIVITY_ONLY_TYPES, MESSAGE_TYPES, handle_client_message
from collab_grpc.names import ACTIVITY_TYPES

MAX_BYTES = 64 * 1024

# A narrowed filter, so that "unchanged" cannot be confused with "reset to everything".
NARROWED = ClientFilter(frozenset({"agent_activity"}), frozenset({"memory_write"}))

GUIDE_ACTIVITY_TYPES = {
    "agent_started",
    "agent_completed",
    "memory_write",
    "memory_read",
    "council_debate",
    "council_synthesis",
    "decision_made",
    "task_assigned",
    "task_completed",
    "message_sent",
    "collaboration_started",
    "collaboration_ended",
}
ALL_NAMES = sorted(MESSAGE_TYPES | ACTIVITY_ONLY_TYPES)


def send(message: object, current: ClientFilter | None = None, max_bytes: int = MAX_BYTES) -> tuple[JSON, ClientFilter]:
    return handle_client_message(json.dumps(message), None, current or ClientFilter(), max_bytes)


def subscribe(names: object, current: ClientFilter | None = None) -> tuple[JSON, ClientFilter]:
    return send({"type": "subscribe", "activity_types": names}, current)


def assert_now_iso(stamp: object) -> None:
    """An ISO 8601 UTC timestamp with an explicit offset, taken just now."""
    assert isinstance(stamp, str)
    parsed = datetime.fromisoformat(stamp)
    assert parsed.utcoffset() == timedelta(0), stamp
    assert stamp.endswith("+00:00"), stamp
    assert abs(datetime.now(UTC) - parsed) < timedelta(seconds=30)


def activity_frame(activity_type: str, kind: str = "agent_activity") -> Frame:
    return Frame("{}", kind, activity_type, 1)


def assert_error(reply: JSON, *fragments: str) -> None:
    assert reply["type"] == "error"
    assert isinstance(reply["error"], str)
    for fragment in fragments:
        assert fragment in reply["error"], reply["error"]
    assert_now_iso(reply["timestamp"])


# -- the names ----------------------------------------------------------------------


def test_the_names_a_client_can_subscribe_to() -> None:
    assert set(ACTIVITY_TYPES) == GUIDE_ACTIVITY_TYPES
    assert len(ACTIVITY_ONLY_TYPES) == 10
    assert GUIDE_ACTIVITY_TYPES - {"collaboration_started", "collaboration_ended"} == ACTIVITY_ONLY_TYPES
    assert {"agent_activity", "activity_completed", "agent_status_update", "memory_update"} <= MESSAGE_TYPES
    assert {"collaboration_started", "collaboration_ended"} <= MESSAGE_TYPES


# -- ping ---------------------------------------------------------------------------


def test_ping_gets_pong_with_an_iso_timestamp() -> None:
    reply, after = send({"type": "ping"}, NARROWED)
    assert set(reply) == {"type", "timestamp"}
    assert reply["type"] == "pong"
    assert_now_iso(reply["timestamp"])
    assert after is NARROWED


def test_ping_with_extra_fields_is_still_a_ping() -> None:
    reply, after = send({"type": "ping", "id": 7})
    assert reply["type"] == "pong"
    assert after == ClientFilter()


# -- subscribe ----------------------------------------------------------------------


def test_subscribe_with_message_type_names_selects_those_message_types() -> None:
    names = ["agent_activity", "memory_update", "agent_status_update"]  # the guide's example
    reply, after = subscribe(names)
    assert after == ClientFilter(frozenset(names), None)
    assert reply["type"] == "subscribed"
    assert reply["activity_types"] == sorted(names)
    assert_now_iso(reply["timestamp"])
    assert after.wants(Frame("{}", "memory_update", None, 3))
    assert after.wants(Frame("{}", "agent_status_update"))
    assert after.wants(activity_frame("task_assigned"))
    assert not after.wants(activity_frame("task_assigned", "activity_completed"))
    assert not after.wants(Frame("{}", "collaboration_started", None, 4))


@pytest.mark.parametrize("name", sorted(MESSAGE_TYPES))
def test_each_message_type_name_selects_exactly_that_message_type(name: str) -> None:
    reply, after = subscribe([name])
    assert after == ClientFilter(frozenset({name}), None)
    assert reply == {"type": "subscribed", "activity_types": [name], "timestamp": reply["timestamp"]}


@pytest.mark.parametrize("name", sorted(ACTIVITY_ONLY_TYPES))
def test_each_activity_only_name_narrows_agent_activity_and_implies_it(name: str) -> None:
    reply, after = subscribe([name])
    assert after == ClientFilter(frozenset({"agent_activity"}), frozenset({name}))
    assert reply["activity_types"] == sorted({"agent_activity", name})


def test_activity_only_names_narrow_agent_activity() -> None:
    reply, after = subscribe(["memory_write", "memory_read"])
    assert after.message_types == frozenset({"agent_activity"})
    assert after.activity_types == frozenset({"memory_write", "memory_read"})
    assert reply["activity_types"] == ["agent_activity", "memory_read", "memory_write"]
    assert after.wants(activity_frame("memory_write"))
    assert after.wants(activity_frame("memory_read"))
    assert not after.wants(activity_frame("task_assigned"))
    assert not after.wants(Frame("{}", "memory_update", None, 2))
    assert not after.wants(Frame("{}", "agent_status_update"))


def test_message_types_and_activity_names_combine() -> None:
    reply, after = subscribe(["memory_update", "activity_completed", "task_assigned"])
    assert after.message_types == frozenset({"memory_update", "activity_completed", "agent_activity"})
    assert after.activity_types == frozenset({"task_assigned"})
    assert reply["activity_types"] == ["activity_completed", "agent_activity", "memory_update", "task_assigned"]
    assert after.wants(Frame("{}", "memory_update", None, 1))
    assert after.wants(activity_frame("task_assigned"))
    assert after.wants(activity_frame("task_assigned", "activity_completed"))
    assert not after.wants(activity_frame("task_completed"))
    assert not after.wants(activity_frame("task_completed", "activity_completed"))


def test_collaboration_started_and_ended_mean_the_message_types() -> None:
    reply, after = subscribe(["collaboration_started", "collaboration_ended"])
    assert after == ClientFilter(frozenset({"collaboration_started", "collaboration_ended"}), None)
    assert reply["activity_types"] == ["collaboration_ended", "collaboration_started"]
    assert after.wants(Frame("{}", "collaboration_started", None, 1))
    assert after.wants(Frame("{}", "collaboration_ended", None, 2))
    # They are not activity names here: activities of that type are not selected.
    assert not after.wants(activity_frame("collaboration_started"))


def test_collaboration_started_with_activity_names_stays_a_message_type() -> None:
    _, after = subscribe(["collaboration_started", "memory_write"])
    assert after.message_types == frozenset({"collaboration_started", "agent_activity"})
    assert after.activity_types == frozenset({"memory_write"})
    assert after.wants(Frame("{}", "collaboration_started", None, 1))


def test_empty_list_resets_to_everything() -> None:
    reply, after = subscribe([], NARROWED)
    assert after == ClientFilter()
    assert reply["type"] == "subscribed"
    assert reply["activity_types"] == sorted(MESSAGE_TYPES)


def test_a_new_subscribe_replaces_the_previous_one() -> None:
    _, first = subscribe(["memory_write"])
    reply, second = subscribe(["memory_update"], first)
    assert second == ClientFilter(frozenset({"memory_update"}), None)
    assert reply["activity_types"] == ["memory_update"]


def test_duplicate_names_are_listed_once() -> None:
    reply, after = subscribe(["memory_write", "memory_write", "agent_activity"])
    assert after == ClientFilter(frozenset({"agent_activity"}), frozenset({"memory_write"}))
    assert reply["activity_types"] == ["agent_activity", "memory_write"]


# -- errors: the reply is `error`, the filter is unchanged ---------------------------


def test_unknown_names_are_refused_and_valid_names_listed() -> None:
    reply, after = subscribe(["memory_write", "bogus", "also_bogus"], NARROWED)
    assert_error(reply, "also_bogus, bogus")
    assert reply["valid"] == ALL_NAMES
    assert after is NARROWED


@pytest.mark.parametrize(
    "message",
    [
        {"type": "subscribe"},
        {"type": "subscribe", "activity_types": None},
        {"type": "subscribe", "activity_types": "memory_write"},
        {"type": "subscribe", "activity_types": {"memory_write": True}},
        {"type": "subscribe", "activity_types": ["memory_write", 3]},
        {"type": "subscribe", "activity_types": [["memory_write"]]},
    ],
    ids=["missing", "null", "string", "object", "non-string item", "nested list"],
)
def test_subscribe_without_a_list_of_names_is_refused(message: JSON) -> None:
    reply, after = send(message, NARROWED)
    assert_error(reply, "activity_types")
    assert after is NARROWED


@pytest.mark.parametrize("text", ["[]", '["ping"]', '"ping"', "42", "null", "true"])
def test_json_that_is_not_an_object_is_refused(text: str) -> None:
    reply, after = handle_client_message(text, None, NARROWED, MAX_BYTES)
    assert_error(reply, "JSON object")
    assert after is NARROWED


@pytest.mark.parametrize("text", ["", "{", "ping", "{'type': 'ping'}", '{"type": "ping",}'])
def test_invalid_json_is_refused(text: str) -> None:
    reply, after = handle_client_message(text, None, NARROWED, MAX_BYTES)
    assert_error(reply, "not valid JSON")
    assert after is NARROWED


@pytest.mark.parametrize("message", [{}, {"type": None}, {"type": 1}, {"type": ["ping"]}, {"kind": "ping"}])
def test_a_missing_or_non_string_type_is_refused(message: JSON) -> None:
    reply, after = send(message, NARROWED)
    assert_error(reply, "string `type`")
    assert after is NARROWED


@pytest.mark.parametrize("kind", ["pong", "PING", "unsubscribe", ""])
def test_an_unknown_type_is_refused(kind: str) -> None:
    reply, after = send({"type": kind, "activity_types": []}, NARROWED)
    assert_error(reply, repr(kind), "ping", "subscribe")
    assert after is NARROWED


@pytest.mark.parametrize("data", [b"\x00\x01\x02", b'{"type": "ping"}', b""])
def test_binary_frames_are_refused(data: bytes) -> None:
    reply, after = handle_client_message(None, data, NARROWED, MAX_BYTES)
    assert_error(reply, "binary", f"{len(data)} bytes")
    assert after is NARROWED


def test_binary_frame_with_no_bytes_at_all_is_refused() -> None:
    reply, after = handle_client_message(None, None, NARROWED, MAX_BYTES)
    assert_error(reply, "binary", "0 bytes")
    assert after is NARROWED


def padded(prefix: str, size: int, pad: str = "x") -> str:
    """A `ping` or `subscribe` JSON text of exactly ``size`` UTF-8 bytes, padded with ``pad``."""
    head = f'{{"type": "{prefix}", "activity_types": [], "pad": "'
    tail = '"}'
    room = size - len((head + tail).encode())
    count = room // len(pad.encode())
    text = head + pad * count + "x" * (room - count * len(pad.encode())) + tail
    assert len(text.encode()) == size
    return text


def test_a_message_of_exactly_the_limit_is_accepted() -> None:
    reply, after = handle_client_message(padded("subscribe", 200), None, NARROWED, 200)
    assert reply["type"] == "subscribed"
    assert after == ClientFilter()


def test_a_message_over_the_limit_is_refused_before_parsing() -> None:
    reply, after = handle_client_message(padded("subscribe", 201), None, NARROWED, 200)
    assert_error(reply, "201 bytes", "200")
    assert after is NARROWED


def test_the_limit_counts_utf8_bytes_not_characters() -> None:
    text = padded("subscribe", 300, "é")  # two bytes per é
    assert len(text) < 200 < len(text.encode())
    reply, after = handle_client_message(text, None, NARROWED, 200)
    assert_error(reply, "300 bytes", "200")
    assert after is NARROWED


def test_four_byte_characters_count_as_four_bytes() -> None:
    text = padded("ping", 204, "🙂")
    assert len(text) < 200
    reply, _ = handle_client_message(text, None, NARROWED, 203)
    assert_error(reply, "204 bytes", "203")
    accepted, _ = handle_client_message(text, None, NARROWED, 204)
    assert accepted["type"] == "pong"
