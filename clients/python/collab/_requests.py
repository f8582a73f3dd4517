"""What each call of the hub sends: one function a call, with the client method's
signature and docstring (the clients take both from here, see _core.Call), that checks
its arguments (ValueError before anything is sent) and builds the request."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from google.protobuf import struct_pb2

from collab._errors import CollabError
from collab_grpc.names import ACTIVITY_STATUSES, ACTIVITY_TYPES, EVENT_KINDS, MEMORY_OPERATIONS
from collab_grpc.v1 import collaboration_pb2 as pb

__all__ = [
    "ACTIVITIES_PER_MESSAGE",
    "ACTIVITY_TYPES",
    "BYTES_PER_MESSAGE",
    "EVENT_KINDS",
    "MEMORY_OPERATIONS",
    "active_collaborations",
    "activity_feed",
    "activity_type_number",
    "agent_status",
    "bulk_messages",
    "complete_activity",
    "end_collaboration",
    "ended_collaborations",
    "get_activity",
    "get_collaboration",
    "memory_updates",
    "messages_to_resend",
    "new_key",
    "query_activities",
    "record_activity",
    "record_decision",
    "record_memory_update",
    "start_collaboration",
    "struct",
    "subscribe",
]

MetadataScalar = str | int | float | bool | None

# Activities per message of a bulk stream: one message each would cost the hub a gRPC
# message per activity, several times the cost of recording it (docs/BENCHMARKS.md).
ACTIVITIES_PER_MESSAGE = 100
# ...and bytes per message, well under gRPC's 4 MiB default (an activity's metadata may
# be 64 KiB); a larger single activity still goes alone.
BYTES_PER_MESSAGE = 1024 * 1024


def new_key() -> str:
    """An idempotency key, so that a retried write is never recorded twice."""
    return uuid.uuid4().hex


def struct(data: Mapping[str, Any] | None) -> struct_pb2.Struct:
    """``data`` as a protobuf Struct (empty for None)."""
    value = struct_pb2.Struct()
    if data:
        value.update(data)
    return value


def _enum(table: Mapping[str, int], field: str, name: str) -> Any:
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"{field} must be one of {', '.join(table)}, got {name!r}") from None


def activity_type_number(name: str) -> Any:
    """The enum value of a guide activity type name (`memory_write`...); ValueError if unknown."""
    return _enum(ACTIVITY_TYPES, "activity_type", name)


# -- writes ---------------------------------------------------------------------------------


def record_activity(
    agent_id: str,
    activity_type: str,
    *,
    department: str = "",
    metadata: Mapping[str, Any] | None = None,
    related_agents: Iterable[str] = (),
    session_id: str | None = None,
    parent_activity_id: str | None = None,
    idempotency_key: str | None = None,
) -> pb.RecordActivityRequest:
    """Record an activity; its id. ``activity_type`` is a guide name (`memory_write`...)."""
    return pb.RecordActivityRequest(
        agent_id=agent_id,
        activity_type=activity_type_number(activity_type),
        department=department,
        metadata=struct(metadata),
        related_agents=list(related_agents),
        session_id=session_id or "",
        parent_activity_id=parent_activity_id or "",
        idempotency_key=idempotency_key or new_key(),
    )


def complete_activity(
    activity_id: str,
    *,
    success: bool = True,
    failure_reason: str = "",
    metadata: Mapping[str, Any] | None = None,
    idempotency_key: str | None = None,
) -> pb.CompleteActivityRequest:
    """Complete an activity, or fail it (``success=False``) with ``failure_reason``; the
    activity as it now is. ``metadata``: keys merged into the activity's metadata (what is
    known only at the end, as token usage); a key given replaces the recorded value."""
    return pb.CompleteActivityRequest(
        activity_id=activity_id,
        success=success,
        failure_reason=failure_reason,
        metadata=struct(metadata),
        idempotency_key=idempotency_key or new_key(),
    )


def start_collaboration(
    participants: Iterable[str], *, session_type: str = "general", metadata: Mapping[str, Any] | None = None
) -> pb.StartCollaborationRequest:
    """Start a collaboration session of ``participants``; its id."""
    return pb.StartCollaborationRequest(
        participants=list(participants), session_type=session_type, metadata=struct(metadata), idempotency_key=new_key()
    )


def end_collaboration(session_id: str) -> pb.EndCollaborationRequest:
    """End a collaboration session; the session as it now is."""
    return pb.EndCollaborationRequest(session_id=session_id, idempotency_key=new_key())


def record_decision(
    session_id: str,
    agent_id: str,
    decision: str,
    *,
    rationale: str = "",
    votes: Mapping[str, str] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> pb.RecordDecisionRequest:
    """Record a decision taken in a session; its id."""
    return pb.RecordDecisionRequest(
        session_id=session_id,
        agent_id=agent_id,
        decision=decision,
        rationale=rationale,
        votes=dict(votes or {}),
        metadata=struct(metadata),
        idempotency_key=new_key(),
    )


def record_memory_update(
    operation: str, item_id: str, agent_id: str, *, metadata: Mapping[str, Any] | None = None
) -> pb.RecordMemoryUpdateRequest:
    """Record a memory operation (`read`, `write`...) on ``item_id``; the update recorded."""
    return pb.RecordMemoryUpdateRequest(
        operation=_enum(MEMORY_OPERATIONS, "operation", operation),
        item_id=item_id,
        agent_id=agent_id,
        metadata=struct(metadata),
        idempotency_key=new_key(),
    )


# -- reads ----------------------------------------------------------------------------------


def agent_status() -> pb.GetAgentStatusRequest:
    """Every agent's state and the totals."""
    return pb.GetAgentStatusRequest()


def activity_feed(
    *, agent_id: str | None = None, limit: int = 50, session_id: str | None = None
) -> pb.GetActivityFeedRequest:
    """The latest ``limit`` activities, newest first (of one agent, of one session)."""
    return pb.GetActivityFeedRequest(agent_id=agent_id or "", limit=limit, session_id=session_id or "")


def get_activity(activity_id: str) -> pb.GetActivityRequest:
    """One activity; NotFound if the hub has no such activity."""
    return pb.GetActivityRequest(activity_id=activity_id)


def active_collaborations() -> pb.ListActiveCollaborationsRequest:
    """The sessions not yet ended."""
    return pb.ListActiveCollaborationsRequest()


def get_collaboration(session_id: str) -> pb.GetCollaborationRequest:
    """One session with its decisions."""
    return pb.GetCollaborationRequest(session_id=session_id)


def ended_collaborations(limit: int = 50) -> pb.ListEndedCollaborationsRequest:
    """The latest ``limit`` ended sessions."""
    return pb.ListEndedCollaborationsRequest(limit=limit)


def memory_updates(agent_id: str | None = None, limit: int = 50) -> pb.ListMemoryUpdatesRequest:
    """The newest ``limit`` memory updates the hub's event log retains (``agent_id``'s
    only, when given), newest first, each with the seq of the event that announced it."""
    return pb.ListMemoryUpdatesRequest(agent_id=agent_id or "", limit=limit)


def subscribe(
    types: Iterable[str] | None,
    agent_ids: Iterable[str] | None,
    activity_types: Iterable[str] | None,
    position: tuple[str, int] | None,
) -> pb.SubscribeEventsRequest:
    """A SubscribeEvents request; ``types`` are event kind names (`activity_recorded`, ...)."""
    request = pb.SubscribeEventsRequest(
        kinds=[_enum(EVENT_KINDS, "types", name) for name in types or ()],
        agent_ids=list(agent_ids or ()),
        activity_types=[activity_type_number(name) for name in activity_types or ()],
    )
    if position is not None:
        request.epoch, request.since_seq = position
    return request


def _metadata_text(value: MetadataScalar) -> str:
    """A metadata value as the search matches it: true/false/null, a number, or the text."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else repr(value)


def _seconds(value: float | datetime) -> float:
    """Epoch seconds, or a datetime (naive: UTC)."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            return (value - datetime(1970, 1, 1)).total_seconds()
        return value.timestamp()
    return float(value)


def query_activities(
    *,
    agent_ids: Iterable[str] = (),
    departments: Iterable[str] = (),
    activity_types: Iterable[str] = (),
    statuses: Iterable[str] = (),
    session_ids: Iterable[str] = (),
    parent_activity_ids: Iterable[str] = (),
    since: float | datetime | None = None,
    until: float | datetime | None = None,
    metadata: Mapping[str, MetadataScalar] | None = None,
    order: str = "desc",
    page_size: int = 50,
) -> pb.QueryActivitiesRequest:
    """Search the history the hub retains, every page in turn (one call a page of
    ``page_size``, 1 to 500, as the reply budget allows), following the cursor: the
    activities of any of ``agent_ids``, and of any of ``departments``, ... recorded at
    or after ``since`` and before ``until`` (epoch seconds or datetimes, naive ones
    UTC), whose metadata has each key of ``metadata`` with that scalar value; newest
    first, or oldest first with ``order="asc"``. Break off at any time. ValueError for
    an unknown type, status or order."""
    if order not in ("desc", "asc"):
        raise ValueError(f"order must be 'desc' or 'asc', got {order!r}")
    request = pb.QueryActivitiesRequest(
        agent_ids=list(agent_ids),
        departments=list(departments),
        activity_types=[activity_type_number(name) for name in activity_types],
        statuses=[_enum(ACTIVITY_STATUSES, "status", name) for name in statuses],
        session_ids=list(session_ids),
        parent_activity_ids=list(parent_activity_ids),
        metadata=[pb.MetadataMatch(key=key, value=_metadata_text(value)) for key, value in (metadata or {}).items()],
        oldest_first=order == "asc",
        limit=page_size,
    )
    if since is not None:
        request.since.FromNanoseconds(round(_seconds(since) * 1e9))
    if until is not None:
        request.until.FromNanoseconds(round(_seconds(until) * 1e9))
    return request


# -- the recorder's batches -----------------------------------------------------------------


def bulk_messages(batch: list[pb.RecordActivityRequest]) -> list[pb.BulkRecordActivitiesRequest]:
    """``batch`` as the messages of one bulk stream, in order: up to ACTIVITIES_PER_MESSAGE
    and BYTES_PER_MESSAGE in each (at least one activity)."""
    messages: list[pb.BulkRecordActivitiesRequest] = []
    current: list[pb.RecordActivityRequest] = []
    size = 0
    for item in batch:
        item_size = item.ByteSize()
        if current and (len(current) >= ACTIVITIES_PER_MESSAGE or size + item_size > BYTES_PER_MESSAGE):
            messages.append(pb.BulkRecordActivitiesRequest(activities=current))
            current, size = [], 0
        current.append(item)
        size += item_size
    if current:
        messages.append(pb.BulkRecordActivitiesRequest(activities=current))
    return messages


def messages_to_resend(
    batch: list[pb.RecordActivityRequest], sent: list[pb.BulkRecordActivitiesRequest], answered: int
) -> list[pb.BulkRecordActivitiesRequest]:
    """When the hub answered ``answered`` items for ``batch`` sent as ``sent``: the batch
    one activity a message, which any hub answers item by item (a message it cannot decode
    is answered as one failed item, and a hub older than ``activities`` answers each message
    as one); its idempotency keys make sending it again safe. CollabError when it already
    went one a message."""
    if len(sent) == len(batch):
        raise CollabError(f"the hub answered {answered} results for {len(batch)} activities")
    return [pb.BulkRecordActivitiesRequest(activity=item) for item in batch]
