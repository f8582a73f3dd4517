"""The store's JSON codec: the same JSON as ``dataclasses.asdict`` + json would give (orjson
writes it; what orjson refuses takes the json module's path), and back to equal objects,
for every kind of event payload."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collab_grpc.model import (
    Activity,
    ActivityCompletion,
    ActivityLink,
    ActivityStatus,
    ActivityType,
    Decision,
    EventKind,
    EventPayload,
    MemoryOperation,
    MemoryUpdate,
    Session,
)
from collab_grpc.store.codec import decode_payload, encode

ACTIVITY = Activity(
    activity_id="act_1",
    agent_id="agent_1",
    department="engineering",
    activity_type=ActivityType.MEMORY_WRITE,
    timestamp=1_764_000_000.25,
    metadata={"item": {"id": "é", "sizes": [1, 2.5, None, True]}, "emoji": "🙂"},
    related_agents=["agent_2", "agent_3"],
    session_id="session_1",
)
DONE = dataclasses.replace(
    ACTIVITY, status=ActivityStatus.FAILED, completed_at=1_764_000_001.5, failure_reason="timeout"
)

PAYLOADS: list[tuple[EventKind, EventPayload]] = [
    (EventKind.ACTIVITY_RECORDED, ACTIVITY),
    (EventKind.ACTIVITY_COMPLETED, ActivityCompletion(DONE, False)),
    (
        EventKind.COLLABORATION_STARTED,
        Session("session_1", ["agent_1", "agent_2"], "review", 1_764_000_000.0, {"topic": "x"}),
    ),
    (
        EventKind.DECISION_RECORDED,
        Decision(
            decision_id="dec_1",
            session_id="session_1",
            agent_id="agent_1",
            decision="ship",
            rationale="tests pass",
            votes={"agent_1": "yes"},
            metadata={},
            timestamp=1_764_000_002.0,
        ),
    ),
    (EventKind.MEMORY_UPDATED, MemoryUpdate(MemoryOperation.WRITE, "item_1", "agent_1", 1_764_000_003.0, {"k": 1})),
    (EventKind.ACTIVITY_LINKED, ActivityLink(dataclasses.replace(DONE, parent_activity_id="act_parent"))),
]


@pytest.mark.parametrize(("kind", "payload"), PAYLOADS, ids=[kind.value for kind, _ in PAYLOADS])
def test_encode_matches_asdict_and_decodes_back(kind: EventKind, payload: EventPayload) -> None:
    text = encode(payload)
    assert same_json(text, dataclasses.asdict(payload))
    assert decode_payload(kind, text) == payload


def same_json(text: str, data: Any) -> bool:
    """``text`` holds ``data``, types too (``==`` takes 1 for True and 1.0 for 1)."""
    return json.dumps(json.loads(text)) == json.dumps(data)


def test_encoding_does_not_share_or_change_the_payload() -> None:
    before = dataclasses.asdict(ACTIVITY)
    encode(ACTIVITY)
    assert dataclasses.asdict(ACTIVITY) == before


_METADATA = st.dictionaries(
    st.text(max_size=6),
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**70), max_value=2**70)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=10),
        lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
        max_leaves=12,
    ),
    max_size=4,
)


@settings(max_examples=300, derandomize=True, database=None)
@given(_METADATA)
def test_any_metadata_is_stored_as_the_json_module_reads_it(metadata: dict[str, Any]) -> None:
    activity = dataclasses.replace(ACTIVITY, metadata=metadata)
    text = encode(activity)
    assert same_json(text, dataclasses.asdict(activity))
    assert decode_payload(EventKind.ACTIVITY_RECORDED, text) == activity


@pytest.mark.parametrize("metadata", [{"big": 2**64}, {"lone": "\ud800"}, {1: "int key"}])
def test_what_orjson_refuses_is_written_by_the_json_module(metadata: dict[Any, Any]) -> None:
    activity = dataclasses.replace(ACTIVITY, metadata=metadata)
    assert encode(activity) == json.dumps(dataclasses.asdict(activity), separators=(",", ":"), ensure_ascii=False)
