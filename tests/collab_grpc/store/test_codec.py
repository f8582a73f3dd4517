"""The store's JSON codec: the same text as ``dataclasses.asdict`` + json would give, and
back to equal objects, for every kind of event payload."""

from __future__ import annotations

import dataclasses
import json

import pytest

from collab_grpc.model import (
    Activity,
    ActivityCompletion,
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
]


@pytest.mark.parametrize(("kind", "payload"), PAYLOADS, ids=[kind.value for kind, _ in PAYLOADS])
def test_encode_matches_asdict_and_decodes_back(kind: EventKind, payload: EventPayload) -> None:
    text = encode(payload)
    assert text == json.dumps(dataclasses.asdict(payload), separators=(",", ":"), ensure_ascii=False)
    assert decode_payload(kind, text) == payload


def test_encoding_does_not_share_or_change_the_payload() -> None:
    before = dataclasses.asdict(ACTIVITY)
    encode(ACTIVITY)
    assert dataclasses.asdict(ACTIVITY) == before
