"""collab.v1 messages -> the guide's JSON, validated against the contract's JSON Schemas
(tests/contract, a checked copy of ../shared/contract)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import jsonschema
import pytest
from google.protobuf import struct_pb2, timestamp_pb2

from bridge import mapping
from bridge.hub import collaboration_state
from bridge.mapping import dumps
from collab_grpc import names
from collab_grpc.v1 import collaboration_pb2 as pb
from tests.support.contract import load_schema

EPOCH = "e-mapping"
T0 = 1_700_000_000  # 2023-11-14T22:13:20Z
ACT_ID = f"act_{T0}_agent_1_a1b2"
SESSION_ID = f"collab_{T0}_s1"
METADATA: dict[str, Any] = {
    "item_id": "item_123",
    "size_bytes": 1024,
    "compression_ratio": 13.3,
    "negative": -7,
    "zero": 0,
    "huge": 1e20,
    "flag": True,
    "nothing": None,
    "nested": {"depth": 2, "tags": ["a", 1, 2.5, {"deep": [3]}], "empty": {}},
    "list": [],
}


# -- builders -------------------------------------------------------------------------


def stamp(seconds: int = T0, nanos: int = 0) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def struct(values: dict[str, Any]) -> struct_pb2.Struct:
    result = struct_pb2.Struct()
    result.update(values)
    return result


def activity(
    activity_type: int = pb.ACTIVITY_TYPE_MEMORY_WRITE, status: int = pb.ACTIVITY_STATUS_ACTIVE, **fields: Any
) -> pb.Activity:
    return pb.Activity(
        activity_id=ACT_ID,
        agent_id="agent_1",
        department="engineering",
        activity_type=activity_type,  # type: ignore[arg-type]
        timestamp=stamp(T0, 250_000_000),
        metadata=struct(METADATA),
        related_agents=["agent_2"],
        status=status,  # type: ignore[arg-type]
        **fields,
    )


def session(ended: bool = False) -> pb.CollaborationSession:
    return pb.CollaborationSession(
        session_id=SESSION_ID,
        participants=["agent_1", "agent_2"],
        session_type="general",
        started_at=stamp(T0),
        ended_at=stamp(T0 + 60) if ended else None,
        activity_count=5,
        decision_count=2,
        metadata=struct({"topic": "launch", "round": 3}),
    )


def decision() -> pb.Decision:
    return pb.Decision(
        decision_id="dec_1",
        session_id=SESSION_ID,
        agent_id="agent_1",
        decision="ship it",
        rationale="tests pass",
        votes={"agent_1": "approve", "agent_2": "reject"},
        metadata=struct({"weight": 2}),
        timestamp=stamp(T0 + 30, 500_000_000),
    )


def memory_update(operation: int = pb.MEMORY_OPERATION_WRITE) -> pb.MemoryUpdate:
    return pb.MemoryUpdate(
        operation=operation,  # type: ignore[arg-type]
        item_id="item_123",
        agent_id="agent_1",
        timestamp=stamp(T0, 750_000_000),
        metadata=struct({"size_bytes": 1024, "compression_ratio": 13.3}),
    )


def event(seq: int, **payload: Any) -> pb.Event:
    return pb.Event(seq=seq, epoch=EPOCH, time=stamp(T0 + seq), **payload)


def completed(success: bool = True) -> pb.ActivityCompleted:
    final = activity(
        pb.ACTIVITY_TYPE_TASK_COMPLETED,
        pb.ACTIVITY_STATUS_COMPLETED if success else pb.ACTIVITY_STATUS_FAILED,
        completed_at=stamp(T0 + 5),
        failure_reason="" if success else "expired",
    )
    return pb.ActivityCompleted(activity=final, success=success)


def agent_status() -> pb.AgentStatusSummary:
    return pb.AgentStatusSummary(
        total_agents=2,
        active_agents=1,
        idle_agents=1,
        active_activities=1,
        active_collaborations=1,
        agents=[
            pb.Agent(
                agent_id="agent_1",
                department="engineering",
                status=pb.AGENT_STATE_ACTIVE,
                current_activity_id=ACT_ID,
                last_activity_id=ACT_ID,
                collaboration_count=1,
            ),
            pb.Agent(agent_id="agent_2", department="", status=pb.AGENT_STATE_IDLE, collaboration_count=0),
        ],
    )


def snapshot(seq: int = 42) -> pb.Snapshot:
    return pb.Snapshot(epoch=EPOCH, seq=seq, agent_status=agent_status(), active_collaborations=[session()])


EVENTS: dict[str, pb.Event] = {
    "agent_activity": event(1, activity_recorded=activity()),
    "activity_completed": event(2, activity_completed=completed()),
    "memory_update": event(3, memory_updated=memory_update()),
    "collaboration_started": event(4, collaboration_started=session()),
    "collaboration_ended": event(5, collaboration_ended=session(ended=True)),
    "decision_recorded": event(6, decision_recorded=decision()),
}


# -- the contract ---------------------------------------------------------------------------


def load(name: str) -> dict[str, Any]:
    return load_schema(name)


@pytest.fixture(scope="module")
def ws_schema() -> dict[str, Any]:
    return load("ws-messages.schema.json")


@pytest.fixture(scope="module")
def rest_schema() -> dict[str, Any]:
    return load("rest-responses.schema.json")


def on_the_wire(message: mapping.JSON) -> Any:
    """The message as a client parses it."""
    return json.loads(dumps(message))


def assert_valid_ws(schema: dict[str, Any], message: mapping.JSON) -> None:
    wire = on_the_wire(message)
    jsonschema.Draft202012Validator(schema["$defs"][wire["type"]]).validate(wire)
    jsonschema.Draft202012Validator(schema).validate(wire)  # exactly one of the message kinds


def assert_iso_utc(value: object, expected: datetime) -> None:
    assert isinstance(value, str)
    assert value.endswith("+00:00"), value
    assert datetime.fromisoformat(value) == expected


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


# -- events ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(EVENTS))
def test_every_event_has_its_type_integer_seq_and_iso_envelope_timestamp(kind: str) -> None:
    message = on_the_wire(mapping.event_json(EVENTS[kind]))
    assert message["type"] == kind
    assert type(message["seq"]) is int
    assert message["seq"] == EVENTS[kind].seq
    assert_iso_utc(message["timestamp"], at(T0 + EVENTS[kind].seq))


@pytest.mark.parametrize("kind", sorted(set(EVENTS) - {"decision_recorded"}))
def test_every_guide_event_validates_against_the_contract(kind: str, ws_schema: dict[str, Any]) -> None:
    assert_valid_ws(ws_schema, mapping.event_json(EVENTS[kind]))


def test_agent_activity_has_the_guide_shape() -> None:
    message = on_the_wire(mapping.event_json(EVENTS["agent_activity"]))
    body = message["activity"]
    assert body["activity_id"] == ACT_ID
    assert body["agent_id"] == "agent_1"
    assert body["department"] == "engineering"
    assert body["activity_type"] == "memory_write"
    assert body["status"] == "active"
    assert body["related_agents"] == ["agent_2"]
    assert type(body["timestamp"]) is float
    assert body["timestamp"] == T0 + 0.25
    assert body["session_id"] is None
    assert body["parent_activity_id"] is None
    assert "completed_at" not in body
    assert "failure_reason" not in body


def test_metadata_numbers_come_back_as_they_went_in() -> None:
    metadata = on_the_wire(mapping.event_json(EVENTS["agent_activity"]))["activity"]["metadata"]
    assert metadata == METADATA
    assert type(metadata["size_bytes"]) is int
    assert dumps({"n": metadata["size_bytes"]}) == '{"n":1024}'  # not 1024.0
    assert type(metadata["negative"]) is int
    assert type(metadata["zero"]) is int
    assert type(metadata["compression_ratio"]) is float
    assert type(metadata["huge"]) is float  # beyond 2**53: not pretended exact
    assert metadata["flag"] is True
    assert metadata["nothing"] is None
    assert type(metadata["nested"]["depth"]) is int
    assert metadata["nested"]["tags"] == ["a", 1, 2.5, {"deep": [3]}]
    assert type(metadata["nested"]["tags"][1]) is int
    assert type(metadata["nested"]["tags"][2]) is float


def test_struct_json_keeps_floats_that_happen_to_be_integral_within_2_pow_53_as_ints() -> None:
    result = mapping.struct_json(struct({"a": 2.0**53, "b": 2.0**53 + 2, "c": -(2.0**53), "d": 0.5}))
    assert result == {"a": 2**53, "b": 2.0**53 + 2, "c": -(2**53), "d": 0.5}
    assert [type(result[key]) for key in "abcd"] == [int, float, int, float]


def test_activity_fields_beyond_the_guide_are_added() -> None:
    done = mapping.activity_json(
        activity(
            pb.ACTIVITY_TYPE_COUNCIL_DEBATE,
            pb.ACTIVITY_STATUS_FAILED,
            session_id=SESSION_ID,
            parent_activity_id="act_1_parent",
            completed_at=stamp(T0 + 9, 100_000_000),
            failure_reason="expired",
        )
    )
    assert done["activity_type"] == "council_debate"
    assert done["status"] == "failed"
    assert done["session_id"] == SESSION_ID
    assert done["parent_activity_id"] == "act_1_parent"
    assert done["completed_at"] == pytest.approx(T0 + 9.1)
    assert type(done["completed_at"]) is float
    assert done["failure_reason"] == "expired"


@pytest.mark.parametrize(
    ("number", "name"),
    [
        (pb.ACTIVITY_TYPE_AGENT_STARTED, "agent_started"),
        (pb.ACTIVITY_TYPE_AGENT_COMPLETED, "agent_completed"),
        (pb.ACTIVITY_TYPE_MEMORY_WRITE, "memory_write"),
        (pb.ACTIVITY_TYPE_MEMORY_READ, "memory_read"),
        (pb.ACTIVITY_TYPE_COUNCIL_DEBATE, "council_debate"),
        (pb.ACTIVITY_TYPE_COUNCIL_SYNTHESIS, "council_synthesis"),
        (pb.ACTIVITY_TYPE_DECISION_MADE, "decision_made"),
        (pb.ACTIVITY_TYPE_TASK_ASSIGNED, "task_assigned"),
        (pb.ACTIVITY_TYPE_TASK_COMPLETED, "task_completed"),
        (pb.ACTIVITY_TYPE_MESSAGE_SENT, "message_sent"),
        (pb.ACTIVITY_TYPE_COLLABORATION_STARTED, "collaboration_started"),
        (pb.ACTIVITY_TYPE_COLLABORATION_ENDED, "collaboration_ended"),
    ],
)
def test_activity_types_have_the_guide_names(number: int, name: str, ws_schema: dict[str, Any]) -> None:
    assert mapping.activity_type_name(number) == name
    assert names.ACTIVITY_TYPES[name] == number
    message = mapping.event_json(event(9, activity_recorded=activity(number)))
    assert message["activity"]["activity_type"] == name
    assert_valid_ws(ws_schema, message)


def test_unspecified_enum_values_have_no_guide_name() -> None:
    assert "unspecified" not in names.ACTIVITY_TYPES
    assert "unspecified" not in names.MEMORY_OPERATIONS
    assert set(names.MEMORY_OPERATIONS) == {"write", "read", "delete"}


@pytest.mark.parametrize("success", [True, False])
def test_activity_completed_has_the_guide_shape(success: bool, ws_schema: dict[str, Any]) -> None:
    message = on_the_wire(mapping.event_json(event(7, activity_completed=completed(success))))
    assert message["activity_id"] == ACT_ID
    assert message["success"] is success
    assert message["agent_id"] == "agent_1"
    assert message["activity_type"] == "task_completed"
    assert message["status"] == ("completed" if success else "failed")
    assert message["failure_reason"] == (None if success else "expired")
    assert_valid_ws(ws_schema, message)


def test_activity_completed_metadata_is_the_added_keys_with_their_merged_values() -> None:
    """The event names the keys a completion added; their values come from the merged
    activity (each carried once). A key not in the metadata is left out."""
    done = completed()
    done.activity.metadata.update({"model": "m-2", "tokens": 12, "recorded": "kept"})
    done.added_keys.extend(["tokens", "model", "missing"])
    message = on_the_wire(mapping.event_json(event(8, activity_completed=done)))
    assert message["metadata"] == {"tokens": 12, "model": "m-2"}
    assert on_the_wire(mapping.event_json(event(9, activity_completed=completed())))["metadata"] == {}


@pytest.mark.parametrize(
    ("operation", "name"),
    [(pb.MEMORY_OPERATION_WRITE, "write"), (pb.MEMORY_OPERATION_READ, "read"), (pb.MEMORY_OPERATION_DELETE, "delete")],
)
def test_memory_update_has_the_guide_shape(operation: int, name: str, ws_schema: dict[str, Any]) -> None:
    message = on_the_wire(mapping.event_json(event(3, memory_updated=memory_update(operation))))
    assert message["update"] == {
        "operation": name,
        "item_id": "item_123",
        "agent_id": "agent_1",
        "timestamp": T0 + 0.75,
        "metadata": {"size_bytes": 1024, "compression_ratio": 13.3},
    }
    assert type(message["update"]["timestamp"]) is float
    assert type(message["update"]["metadata"]["size_bytes"]) is int
    assert_valid_ws(ws_schema, message)


def test_collaboration_started_has_the_guide_shape() -> None:
    message = on_the_wire(mapping.event_json(EVENTS["collaboration_started"]))
    started = message["session"]
    assert started["session_id"] == SESSION_ID
    assert started["participants"] == ["agent_1", "agent_2"]
    assert_iso_utc(started["started_at"], at(T0))
    assert started["ended_at"] is None
    assert started["session_type"] == "general"
    assert started["activity_count"] == 5
    assert started["decision_count"] == 2
    assert started["metadata"] == {"topic": "launch", "round": 3}
    assert type(started["metadata"]["round"]) is int


def test_collaboration_ended_has_the_guide_shape() -> None:
    message = on_the_wire(mapping.event_json(EVENTS["collaboration_ended"]))
    assert message["session_id"] == SESSION_ID
    assert message["session"]["session_id"] == SESSION_ID
    assert_iso_utc(message["session"]["ended_at"], at(T0 + 60))


def test_decision_recorded_message() -> None:
    message = on_the_wire(mapping.event_json(EVENTS["decision_recorded"]))
    assert message["decision"] == {
        "decision_id": "dec_1",
        "session_id": SESSION_ID,
        "agent_id": "agent_1",
        "decision": "ship it",
        "rationale": "tests pass",
        "votes": {"agent_1": "approve", "agent_2": "reject"},
        "metadata": {"weight": 2},
        "timestamp": T0 + 30.5,
    }
    assert type(message["decision"]["metadata"]["weight"]) is int


def test_an_event_without_payload_is_refused() -> None:
    with pytest.raises(ValueError, match="payload"):
        mapping.event_json(pb.Event(seq=3, epoch=EPOCH, time=stamp()))


def test_envelope_timestamp_keeps_sub_second_precision() -> None:
    message = mapping.event_json(pb.Event(seq=1, time=stamp(T0, 123_456_000), memory_updated=memory_update()))
    assert_iso_utc(message["timestamp"], datetime(2023, 11, 14, 22, 13, 20, 123456, UTC))


# -- status and snapshot -----------------------------------------------------------------


def test_agent_status_json_is_the_guide_agent_status_body(rest_schema: dict[str, Any]) -> None:
    body = on_the_wire(mapping.agent_status_json(agent_status()))
    jsonschema.Draft202012Validator(rest_schema["$defs"]["agent-status"]).validate(body)
    assert body["total_agents"] == 2
    assert body["active_agents"] == 1
    assert body["idle_agents"] == 1
    assert body["active_activities"] == 1
    assert body["active_collaborations"] == 1
    assert body["agents"] == {
        "agent_1": {
            "status": "active",
            "current_activity": ACT_ID,
            "last_activity": ACT_ID,
            "collaboration_count": 1,
            "department": "engineering",
        },
        "agent_2": {
            "status": "idle",
            "current_activity": None,
            "last_activity": None,
            "collaboration_count": 0,
            "department": "",
        },
    }


def test_status_update_has_the_guide_shape(ws_schema: dict[str, Any]) -> None:
    update = pb.StreamAgentStatusResponse(time=stamp(T0 + 2), agent_status=agent_status())
    message = mapping.status_update_json(update)
    assert_valid_ws(ws_schema, message)
    wire = on_the_wire(message)
    assert wire["type"] == "agent_status_update"
    assert_iso_utc(wire["timestamp"], at(T0 + 2))
    assert wire["agents"]["agent_1"]["status"] == "active"
    assert wire["agents"]["agent_1"]["current_activity"] == ACT_ID
    assert wire["agents"]["agent_1"]["last_activity"] == ACT_ID
    assert wire["agents"]["agent_2"] == {
        "status": "idle",
        "current_activity": None,
        "last_activity": None,
        "collaboration_count": 0,
        "department": "",
    }
    assert "seq" not in wire


def test_collaboration_state_has_the_guide_shape(ws_schema: dict[str, Any]) -> None:
    message = collaboration_state(snapshot(42))
    assert_valid_ws(ws_schema, message)
    wire = on_the_wire(message)
    assert wire["type"] == "collaboration_state"
    assert wire["epoch"] == EPOCH
    assert type(wire["seq"]) is int
    assert wire["seq"] == 42
    assert wire["agent_status"] == on_the_wire(mapping.agent_status_json(agent_status()))
    assert wire["active_collaborations"] == [on_the_wire(mapping.session_json(session()))]
    stamp_now = datetime.fromisoformat(wire["timestamp"])
    assert wire["timestamp"].endswith("+00:00")
    assert abs((datetime.now(UTC) - stamp_now).total_seconds()) < 30
    assert "reset" not in wire
    assert collaboration_state(snapshot(), reset=True)["reset"] is True


def test_an_empty_snapshot_is_a_valid_collaboration_state(ws_schema: dict[str, Any]) -> None:
    message = collaboration_state(pb.Snapshot(epoch=EPOCH, seq=0))
    assert_valid_ws(ws_schema, message)
    assert message["agent_status"]["agents"] == {}
    assert message["active_collaborations"] == []
    assert message["seq"] == 0


def test_iso_and_seconds() -> None:
    assert mapping.iso(stamp(0)) == "1970-01-01T00:00:00+00:00"
    assert mapping.seconds(stamp(T0, 500_000_000)) == T0 + 0.5
    assert type(mapping.seconds(stamp(T0))) is float
    assert mapping.iso_now().endswith("+00:00")
