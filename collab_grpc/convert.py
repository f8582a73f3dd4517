"""Conversions between the domain model and the collab.v1 protobuf messages, for the
servicer (requests in, replies and events out).

Imports the generated messages and the domain model, never grpc: the conversions are
tested, and the ingest benchmark builds replies, without a server.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, TypeVar

from google.protobuf import struct_pb2, timestamp_pb2
from google.protobuf.message import Message

from collab_grpc import names
from collab_grpc.errors import InvalidArgument
from collab_grpc.events import EventFilter
from collab_grpc.model import (
    Activity,
    ActivityCompletion,
    ActivityLink,
    ActivityStatus,
    ActivityType,
    AgentRetirement,
    AgentStatusSummary,
    AgentView,
    Decision,
    Event,
    EventKind,
    MemoryOperation,
    MemoryUpdate,
    Session,
    Snapshot,
)
from collab_grpc.v1 import collaboration_pb2 as pb

__all__ = [
    "ACTIVITY_TYPE_FROM_PROTO",
    "ACTIVITY_TYPE_TO_PROTO",
    "EVENT_KIND_FROM_PROTO",
    "EVENT_KIND_TO_PROTO",
    "MEMORY_OPERATION_FROM_PROTO",
    "MEMORY_OPERATION_TO_PROTO",
    "activity_to_proto",
    "activity_type_from_proto",
    "agent_status_to_proto",
    "agent_to_proto",
    "decision_to_proto",
    "entry_size",
    "event_filter_from_proto",
    "event_to_proto",
    "fill_activity",
    "fill_within",
    "memory_operation_from_proto",
    "memory_update_to_proto",
    "seconds_from_timestamp",
    "session_to_proto",
    "set_timestamp",
    "snapshot_to_proto",
    "struct_from_dict",
    "struct_to_dict",
    "timestamp_from_seconds",
]

# The domain enums' values are the guide's names: mapped through the shared table.
ACTIVITY_TYPE_TO_PROTO: dict[ActivityType, pb.ActivityType.ValueType] = {
    t: names.ACTIVITY_TYPES[t.value] for t in ActivityType
}
ACTIVITY_TYPE_FROM_PROTO = {v: k for k, v in ACTIVITY_TYPE_TO_PROTO.items()}
MEMORY_OPERATION_TO_PROTO: dict[MemoryOperation, pb.MemoryOperation.ValueType] = {
    o: names.MEMORY_OPERATIONS[o.value] for o in MemoryOperation
}
MEMORY_OPERATION_FROM_PROTO = {v: k for k, v in MEMORY_OPERATION_TO_PROTO.items()}
EVENT_KIND_TO_PROTO: dict[EventKind, pb.EventKind.ValueType] = {k: names.EVENT_KINDS[k.value] for k in EventKind}
EVENT_KIND_FROM_PROTO = {v: k for k, v in EVENT_KIND_TO_PROTO.items()}
_ACTIVITY_STATUS_TO_PROTO: dict[ActivityStatus, pb.ActivityStatus.ValueType] = {
    s: names.ACTIVITY_STATUSES[s.value] for s in ActivityStatus
}


def timestamp_from_seconds(seconds: float) -> timestamp_pb2.Timestamp:
    return set_timestamp(timestamp_pb2.Timestamp(), seconds)


def set_timestamp(stamp: timestamp_pb2.Timestamp, seconds: float) -> timestamp_pb2.Timestamp:
    """``stamp.FromNanoseconds`` of ``seconds``, without its Python method's overhead."""
    stamp.seconds, stamp.nanos = divmod(round(seconds * 1e9), 1_000_000_000)
    return stamp


def seconds_from_timestamp(stamp: timestamp_pb2.Timestamp) -> float:
    return stamp.seconds + stamp.nanos / 1e9


def struct_to_dict(struct: struct_pb2.Struct, field: str = "metadata") -> dict[str, Any]:
    """A request's Struct as JSON data; one JSON cannot hold (NaN, infinity) is refused.

    What ``json_format.MessageToDict`` gives for a Struct, at a fraction of its cost (it
    runs for every record)."""
    try:
        return _json_object(struct)
    except ValueError as exc:
        raise InvalidArgument(f"{field} is not valid JSON (numbers must be finite): {exc}") from None


def _json_object(struct: struct_pb2.Struct) -> dict[str, Any]:
    fields = struct.fields  # by key: a protobuf map's items() is a slow Python view
    return {key: _json_value(fields[key]) for key in fields}


def _json_value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            raise ValueError(f"{number} is not a JSON number")
        return number
    if kind == "struct_value":
        return _json_object(value.struct_value)
    if kind == "list_value":
        return [_json_value(item) for item in value.list_value.values]
    if kind == "bool_value":
        return value.bool_value
    return None  # null_value, or a Value with nothing set (as json_format reads it)


def struct_from_dict(data: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    if data:
        struct.update(data)
    return struct


def activity_type_from_proto(value: int) -> ActivityType:
    if value == pb.ACTIVITY_TYPE_UNSPECIFIED:
        raise InvalidArgument("activity_type is required")
    try:
        return ACTIVITY_TYPE_FROM_PROTO[value]  # type: ignore[index]
    except KeyError:
        raise InvalidArgument(f"activity_type {value} is not a known activity type") from None


def memory_operation_from_proto(value: int) -> MemoryOperation:
    if value == pb.MEMORY_OPERATION_UNSPECIFIED:
        raise InvalidArgument("operation is required (write, read or delete)")
    try:
        return MEMORY_OPERATION_FROM_PROTO[value]  # type: ignore[index]
    except KeyError:
        raise InvalidArgument(f"operation {value} is not a known memory operation") from None


def event_filter_from_proto(request: pb.SubscribeEventsRequest) -> EventFilter:
    kinds = set()
    for kind in request.kinds:
        if kind not in EVENT_KIND_FROM_PROTO:
            raise InvalidArgument(f"kinds: {kind} is not a known event kind")
        kinds.add(EVENT_KIND_FROM_PROTO[kind])
    return EventFilter(
        kinds=frozenset(kinds),
        activity_types=frozenset(activity_type_from_proto(t) for t in request.activity_types),
        agent_ids=frozenset(request.agent_ids),
    )


def activity_to_proto(activity: Activity) -> pb.Activity:
    return fill_activity(pb.Activity(), activity)


def fill_activity(message: pb.Activity, activity: Activity) -> pb.Activity:
    """Write ``activity`` into ``message``, an empty one (a field of the answer or event
    being built: filled in place, it is not built apart and then copied in)."""
    message.activity_id = activity.activity_id
    message.agent_id = activity.agent_id
    message.department = activity.department
    message.activity_type = ACTIVITY_TYPE_TO_PROTO[activity.activity_type]
    set_timestamp(message.timestamp, activity.timestamp)
    message.metadata.SetInParent()  # present even when empty, as it always was
    if activity.metadata:
        message.metadata.update(activity.metadata)
    message.related_agents.extend(activity.related_agents)
    message.status = _ACTIVITY_STATUS_TO_PROTO[activity.status]
    message.session_id = activity.session_id
    message.parent_activity_id = activity.parent_activity_id
    message.failure_reason = activity.failure_reason
    if activity.completed_at is not None:
        set_timestamp(message.completed_at, activity.completed_at)
    return message


# -- reply budgets: lists filled while their real serialised size fits -----------------

# The most an int32 field takes (tag and a 10-byte varint: negative numbers take 10).
INT_FIELD_BYTES = 11


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def entry_size(message_size: int) -> int:
    """What one element of a repeated message field (numbers 1 to 15) adds to its message:
    a one-byte tag, the length as a varint, the element's ``ByteSize()``."""
    return 1 + _varint_size(message_size) + message_size


class _Repeated(Protocol):
    def append(self, value: Any) -> None: ...


M = TypeVar("M", bound=Message)


def fill_within(
    field: _Repeated, messages: Iterable[M], room: int, limit: int | None = None
) -> tuple[int, int, M | None]:
    """Append ``messages`` to the repeated ``field`` while their serialised size fits in
    ``room`` bytes (and, with ``limit``, at most that many). Returns how many were added,
    the bytes they add, and the first one left out (None when ``messages`` ran out):
    stopping at the first one that does not fit keeps the order a cursor continues."""
    count = used = 0
    for message in messages:
        size = entry_size(message.ByteSize())
        if (limit is not None and count >= limit) or used + size > room:
            return count, used, message
        field.append(message)
        count += 1
        used += size
    return count, used, None


def agent_to_proto(view: AgentView) -> pb.Agent:
    return pb.Agent(
        agent_id=view.agent_id,
        department=view.department,
        status=pb.AGENT_STATE_ACTIVE if view.active else pb.AGENT_STATE_IDLE,
        current_activity_id=view.current_activity_id or "",
        last_activity_id=view.last_activity_id or "",
        collaboration_count=view.collaboration_count,
    )


def agent_status_to_proto(summary: AgentStatusSummary, max_bytes: int | None = None) -> pb.AgentStatusSummary:
    """The summary; with ``max_bytes``, its serialised size at most that: agents are taken
    in the summary's order (the ones to keep first) while they fit, listed in agent_id
    order, and ``agents_omitted`` says how many were left out."""
    message = pb.AgentStatusSummary(
        total_agents=summary.total_agents,
        active_agents=summary.active_agents,
        idle_agents=summary.idle_agents,
        active_activities=summary.active_activities,
        active_collaborations=summary.active_collaborations,
    )
    agents = [agent_to_proto(view) for view in summary.agents]
    if max_bytes is not None:
        kept: list[pb.Agent] = []
        fill_within(kept, agents, max_bytes - message.ByteSize() - INT_FIELD_BYTES)
        agents = sorted(kept, key=lambda agent: agent.agent_id)
    message.agents.extend(agents)
    message.agents_omitted = summary.total_agents - len(agents)
    return message


def session_to_proto(session: Session) -> pb.CollaborationSession:
    message = pb.CollaborationSession(
        session_id=session.session_id,
        participants=session.participants,
        session_type=session.session_type,
        started_at=timestamp_from_seconds(session.started_at),
        activity_count=session.activity_count,
        decision_count=session.decision_count,
        metadata=struct_from_dict(session.metadata),
    )
    if session.ended_at is not None:
        message.ended_at.CopyFrom(timestamp_from_seconds(session.ended_at))
    return message


def decision_to_proto(decision: Decision) -> pb.Decision:
    return pb.Decision(
        decision_id=decision.decision_id,
        session_id=decision.session_id,
        agent_id=decision.agent_id,
        decision=decision.decision,
        rationale=decision.rationale,
        votes=decision.votes,
        metadata=struct_from_dict(decision.metadata),
        timestamp=timestamp_from_seconds(decision.timestamp),
    )


def memory_update_to_proto(update: MemoryUpdate) -> pb.MemoryUpdate:
    return pb.MemoryUpdate(
        operation=MEMORY_OPERATION_TO_PROTO[update.operation],
        item_id=update.item_id,
        agent_id=update.agent_id,
        timestamp=timestamp_from_seconds(update.timestamp),
        metadata=struct_from_dict(update.metadata),
    )


def event_to_proto(event: Event) -> pb.Event:
    message = pb.Event(seq=event.seq, epoch=event.epoch, time=timestamp_from_seconds(event.time))
    payload = event.payload
    kind = event.kind
    if kind is EventKind.ACTIVITY_RECORDED and isinstance(payload, Activity):
        fill_activity(message.activity_recorded, payload)
    elif kind is EventKind.ACTIVITY_COMPLETED and isinstance(payload, ActivityCompletion):
        fill_activity(message.activity_completed.activity, payload.activity)
        message.activity_completed.success = payload.success
        message.activity_completed.added_keys.extend(payload.added_keys)
    elif kind is EventKind.MEMORY_UPDATED and isinstance(payload, MemoryUpdate):
        message.memory_updated.CopyFrom(memory_update_to_proto(payload))
    elif kind is EventKind.COLLABORATION_STARTED and isinstance(payload, Session):
        message.collaboration_started.CopyFrom(session_to_proto(payload))
    elif kind is EventKind.COLLABORATION_ENDED and isinstance(payload, Session):
        message.collaboration_ended.CopyFrom(session_to_proto(payload))
    elif kind is EventKind.DECISION_RECORDED and isinstance(payload, Decision):
        message.decision_recorded.CopyFrom(decision_to_proto(payload))
    elif kind is EventKind.AGENT_RETIRED and isinstance(payload, AgentRetirement):
        retired = message.agent_retired
        retired.agent_id = payload.agent_id
        retired.department = payload.department
        retired.last_activity_id = payload.last_activity_id or ""
        set_timestamp(retired.last_seen, payload.last_seen)
    elif kind is EventKind.ACTIVITY_LINKED and isinstance(payload, ActivityLink):
        linked = message.activity_linked
        linked.activity_id = payload.activity_id
        linked.parent_activity_id = payload.parent_activity_id
        fill_activity(linked.activity, payload.activity)
    else:  # pragma: no cover - the state only builds the pairs above
        raise TypeError(f"event {event.seq}: {kind} cannot carry {type(payload).__name__}")
    return message


def snapshot_to_proto(snapshot: Snapshot, max_bytes: int | None = None) -> pb.Snapshot:
    """The snapshot; with ``max_bytes``, its serialised size at most that: the oldest
    active sessions that fit in half of it, then the agents that fit in the rest (see
    agent_status_to_proto); ``*_omitted`` say how many were left out."""
    message = pb.Snapshot(epoch=snapshot.epoch, seq=snapshot.seq)
    sessions = (session_to_proto(s) for s in snapshot.active_collaborations)
    if max_bytes is None:
        message.active_collaborations.extend(sessions)
        message.agent_status.CopyFrom(agent_status_to_proto(snapshot.agent_status))
    else:
        fill_within(message.active_collaborations, sessions, max_bytes // 2)
        # The agent_status field's own tag and length, and the omitted count, come on top.
        room = max_bytes - message.ByteSize() - 2 * INT_FIELD_BYTES
        message.agent_status.CopyFrom(agent_status_to_proto(snapshot.agent_status, room))
    message.active_collaborations_omitted = snapshot.agent_status.active_collaborations - len(
        message.active_collaborations
    )
    return message
