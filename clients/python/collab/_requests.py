"""Request building shared by the sync and asyncio clients."""

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
    "BulkProgress",
    "activity_type",
    "bulk_messages",
    "messages_to_resend",
    "new_key",
    "query_activities",
    "record_activity",
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
    value = struct_pb2.Struct()
    if data:
        value.update(data)
    return value


def _enum(table: Mapping[str, int], field: str, name: str) -> Any:
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"{field} must be one of {', '.join(table)}, got {name!r}") from None


def activity_type(name: str) -> Any:
    return _enum(ACTIVITY_TYPES, "activity_type", name)


def record_activity(
    agent_id: str,
    kind: str,
    *,
    department: str = "",
    metadata: Mapping[str, Any] | None = None,
    related_agents: Iterable[str] = (),
    session_id: str | None = None,
    parent_activity_id: str | None = None,
    idempotency_key: str | None = None,
) -> pb.RecordActivityRequest:
    return pb.RecordActivityRequest(
        agent_id=agent_id,
        activity_type=activity_type(kind),
        department=department,
        metadata=struct(metadata),
        related_agents=list(related_agents),
        session_id=session_id or "",
        parent_activity_id=parent_activity_id or "",
        idempotency_key=idempotency_key or new_key(),
    )


def memory_operation(name: str) -> Any:
    return _enum(MEMORY_OPERATIONS, "operation", name)


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
        activity_types=[activity_type(name) for name in activity_types or ()],
    )
    if position is not None:
        request.epoch, request.since_seq = position
    return request


def complete_activity(
    activity_id: str, success: bool, failure_reason: str, idempotency_key: str | None
) -> pb.CompleteActivityRequest:
    return pb.CompleteActivityRequest(
        activity_id=activity_id,
        success=success,
        failure_reason=failure_reason,
        idempotency_key=idempotency_key or new_key(),
    )


def start_collaboration(
    participants: Iterable[str], session_type: str, metadata: Mapping[str, Any] | None
) -> pb.StartCollaborationRequest:
    return pb.StartCollaborationRequest(
        participants=list(participants), session_type=session_type, metadata=struct(metadata), idempotency_key=new_key()
    )


def end_collaboration(session_id: str) -> pb.EndCollaborationRequest:
    return pb.EndCollaborationRequest(session_id=session_id, idempotency_key=new_key())


def record_decision(
    session_id: str,
    agent_id: str,
    decision: str,
    rationale: str,
    votes: Mapping[str, str] | None,
    metadata: Mapping[str, Any] | None,
) -> pb.RecordDecisionRequest:
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
    operation: str, item_id: str, agent_id: str, metadata: Mapping[str, Any] | None
) -> pb.RecordMemoryUpdateRequest:
    return pb.RecordMemoryUpdateRequest(
        operation=memory_operation(operation),
        item_id=item_id,
        agent_id=agent_id,
        metadata=struct(metadata),
        idempotency_key=new_key(),
    )


def activity_feed(agent_id: str | None, limit: int, session_id: str | None) -> pb.GetActivityFeedRequest:
    return pb.GetActivityFeedRequest(agent_id=agent_id or "", limit=limit, session_id=session_id or "")


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


class BulkProgress:
    """A batch sent over one or more bulk streams: the results so far, the messages to
    send next. The hub answers within its reply budget: an answer that reached it says
    ``incomplete`` and covers the first items only; the rest goes on a new stream."""

    def __init__(self, batch: list[pb.RecordActivityRequest]) -> None:
        self.batch = batch
        self.results: list[pb.BulkRecordResult] = []
        self.messages = bulk_messages(batch)

    def take(self, reply: pb.BulkRecordActivitiesResponse) -> bool:
        """Take in one stream's answer; True once every item of the batch is answered."""
        pending = self.batch[len(self.results) :]
        answered = len(reply.results)
        if answered == len(pending):
            self.results += reply.results
            return True
        if reply.incomplete and 0 < answered < len(pending):
            self.results += reply.results
            self.messages = bulk_messages(pending[answered:])
            return False
        self.messages = messages_to_resend(pending, self.messages, answered)
        return False


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
    """The first page's request; ValueError for an unknown type, status or order."""
    if order not in ("desc", "asc"):
        raise ValueError(f"order must be 'desc' or 'asc', got {order!r}")
    request = pb.QueryActivitiesRequest(
        agent_ids=list(agent_ids),
        departments=list(departments),
        activity_types=[activity_type(name) for name in activity_types],
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
