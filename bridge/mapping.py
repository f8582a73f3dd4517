"""collab.v1 messages -> the guide's JSON messages and REST bodies.

Shapes follow ../shared/seed/REALTIME_COLLABORATION_GUIDE.md exactly; fields beyond the
guide (``seq``, ``epoch``, ``session_id``...) are added, never renamed or dropped.
Envelope ``timestamp`` is ISO 8601 UTC with offset; ``activity.timestamp`` and
``update.timestamp`` are epoch seconds, as in the guide.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import orjson
from google.protobuf import struct_pb2, timestamp_pb2

from collab_grpc.names import ACTIVITY_STATUS_NAMES, ACTIVITY_TYPE_NAMES, MEMORY_OPERATION_NAMES
from collab_grpc.v1 import collaboration_pb2 as pb

__all__ = [
    "JSON",
    "activity_json",
    "activity_type_name",
    "added_metadata_json",
    "agent_json",
    "agent_status_json",
    "agents_json",
    "decision_json",
    "dumps",
    "event_json",
    "iso",
    "iso_now",
    "memory_update_json",
    "seconds",
    "session_json",
    "status_update_json",
    "struct_json",
]

JSON = dict[str, Any]


# Struct stores numbers as doubles; integral ones within float precision go back out as
# ints, so `{"size_bytes": 1024}` is not turned into 1024.0.
_MAX_EXACT_INT = 2**53


def activity_type_name(number: int) -> str:
    return ACTIVITY_TYPE_NAMES[number]


def seconds(stamp: timestamp_pb2.Timestamp) -> float:
    return stamp.seconds + stamp.nanos / 1e9


def _plain(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return struct_json(value.struct_value)
    if kind == "list_value":
        return [_plain(item) for item in value.list_value.values]
    if kind == "number_value":
        number = value.number_value
        if math.isfinite(number) and number.is_integer() and abs(number) <= _MAX_EXACT_INT:
            return int(number)
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None


def struct_json(struct: struct_pb2.Struct) -> JSON:
    return {key: _plain(value) for key, value in struct.fields.items()}


def added_metadata_json(done: pb.ActivityCompleted) -> JSON:
    """The keys a completion added or replaced, with their values: the activity's merged
    metadata restricted to ``added_keys`` (the event carries each value once)."""
    fields = done.activity.metadata.fields
    return {key: _plain(fields[key]) for key in done.added_keys if key in fields}


def iso(stamp: timestamp_pb2.Timestamp) -> str:
    return datetime.fromtimestamp(seconds(stamp), UTC).isoformat()


def iso_now() -> str:
    return datetime.now(UTC).isoformat()


def activity_json(activity: pb.Activity) -> JSON:
    body: JSON = {
        "activity_id": activity.activity_id,
        "agent_id": activity.agent_id,
        "department": activity.department,
        "activity_type": ACTIVITY_TYPE_NAMES[activity.activity_type],
        "timestamp": seconds(activity.timestamp),
        "metadata": struct_json(activity.metadata),
        "related_agents": list(activity.related_agents),
        "status": ACTIVITY_STATUS_NAMES[activity.status],
        "session_id": activity.session_id or None,
        "parent_activity_id": activity.parent_activity_id or None,
    }
    if activity.HasField("completed_at"):
        body["completed_at"] = seconds(activity.completed_at)
    if activity.failure_reason:
        body["failure_reason"] = activity.failure_reason
    return body


def session_json(session: pb.CollaborationSession) -> JSON:
    return {
        "session_id": session.session_id,
        "participants": list(session.participants),
        "session_type": session.session_type,
        "started_at": iso(session.started_at),
        "ended_at": iso(session.ended_at) if session.HasField("ended_at") else None,
        "activity_count": session.activity_count,
        "decision_count": session.decision_count,
        "metadata": struct_json(session.metadata),
    }


def decision_json(decision: pb.Decision) -> JSON:
    return {
        "decision_id": decision.decision_id,
        "session_id": decision.session_id,
        "agent_id": decision.agent_id,
        "decision": decision.decision,
        "rationale": decision.rationale,
        "votes": dict(decision.votes),
        "metadata": struct_json(decision.metadata),
        "timestamp": seconds(decision.timestamp),
    }


def memory_update_json(update: pb.MemoryUpdate) -> JSON:
    return {
        "operation": MEMORY_OPERATION_NAMES[update.operation],
        "item_id": update.item_id,
        "agent_id": update.agent_id,
        "timestamp": seconds(update.timestamp),
        "metadata": struct_json(update.metadata),
    }


def agent_json(agent: pb.Agent) -> JSON:
    """One agent as the guide's `agents` map holds it (keyed by its agent_id)."""
    return {
        "status": "active" if agent.status == pb.AGENT_STATE_ACTIVE else "idle",
        "current_activity": agent.current_activity_id or None,
        "last_activity": agent.last_activity_id or None,
        "collaboration_count": agent.collaboration_count,
        "department": agent.department,
    }


def agents_json(agents: Iterable[pb.Agent]) -> JSON:
    return {agent.agent_id: agent_json(agent) for agent in agents}


def agent_status_json(summary: pb.AgentStatusSummary) -> JSON:
    """The guide's `agent-status` body (also `collaboration_state.agent_status`), with
    ``agents_omitted``: how many agents the capped ``agents`` map leaves out (the counts
    are exact; ``GET /agents`` pages through every one)."""
    return {
        "total_agents": summary.total_agents,
        "active_agents": summary.active_agents,
        "idle_agents": summary.idle_agents,
        "active_activities": summary.active_activities,
        "active_collaborations": summary.active_collaborations,
        "agents": agents_json(summary.agents),
        "agents_omitted": summary.agents_omitted,
    }


def status_update_json(update: pb.StreamAgentStatusResponse) -> JSON:
    """The guide's `agent_status_update` message, with ``agents_omitted`` beside ``agents``."""
    return {
        "type": "agent_status_update",
        "timestamp": iso(update.time),
        "agents": agents_json(update.agent_status.agents),
        "agents_omitted": update.agent_status.agents_omitted,
    }


def event_json(event: pb.Event) -> JSON:
    """One event as the guide's WebSocket message, with its ``seq``."""
    kind = event.WhichOneof("payload")
    message: JSON
    if kind == "activity_recorded":
        message = {"type": "agent_activity", "activity": activity_json(event.activity_recorded)}
    elif kind == "activity_completed":
        done = event.activity_completed
        message = {
            "type": "activity_completed",
            "activity_id": done.activity.activity_id,
            "success": done.success,
            "agent_id": done.activity.agent_id,
            "activity_type": ACTIVITY_TYPE_NAMES[done.activity.activity_type],
            "status": ACTIVITY_STATUS_NAMES[done.activity.status],
            "failure_reason": done.activity.failure_reason or None,
            # Additive: the metadata keys this completion added or replaced, with their
            # values as merged into the activity ({} for none).
            "metadata": added_metadata_json(done),
        }
    elif kind == "memory_updated":
        message = {"type": "memory_update", "update": memory_update_json(event.memory_updated)}
    elif kind == "collaboration_started":
        message = {"type": "collaboration_started", "session": session_json(event.collaboration_started)}
    elif kind == "collaboration_ended":
        ended = event.collaboration_ended
        message = {"type": "collaboration_ended", "session_id": ended.session_id, "session": session_json(ended)}
    elif kind == "decision_recorded":
        message = {"type": "decision_recorded", "decision": decision_json(event.decision_recorded)}
    elif kind == "agent_retired":
        # Not in the guide (additive): an idle agent left the live status; drop its card.
        retired = event.agent_retired
        message = {
            "type": "agent_retired",
            "agent_id": retired.agent_id,
            "department": retired.department,
            "last_activity": retired.last_activity_id or None,
            "last_seen": seconds(retired.last_seen),
        }
    elif kind == "activity_linked":
        # Not in the guide (additive): an activity recorded as a root got its parent (which
        # arrived later); a tree view moves it under that parent.
        linked = event.activity_linked
        message = {
            "type": "activity_linked",
            "activity_id": linked.activity_id,
            "parent_activity_id": linked.parent_activity_id,
            "agent_id": linked.activity.agent_id,
            "activity_type": ACTIVITY_TYPE_NAMES[linked.activity.activity_type],
        }
    else:
        raise ValueError(f"event {event.seq} has no payload the bridge knows ({kind})")
    message["timestamp"] = iso(event.time)
    message["seq"] = event.seq
    return message


# Built once: json.dumps with any option set builds a new encoder on every call (REST
# bodies have their own, built once too: bridge.errors.CompactJSONResponse).
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def dumps(message: JSON) -> str:
    """Encode ``message`` as compact JSON text, non-ASCII characters as they are: with
    orjson (made once per event, it keeps the bridge's upstream ahead of a burst such as a
    bulk ingest), or the json module for what orjson refuses (an integer past 64 bits)."""
    try:
        return orjson.dumps(message).decode()
    except orjson.JSONEncodeError:
        return _ENCODER.encode(message)
