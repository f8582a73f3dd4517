"""The guide's REST routes (plus record-decision, one collaboration, ended sessions).

Each route calls one unary RPC with the caller's own credential: the server stays the one
place that authenticates, authorises, validates and rate-limits. gRPC statuses become
HTTP statuses with a JSON body ``{"detail": "<what is wrong>", "code": "<STATUS>"}``
(bridge/errors.py). The routes are module-level functions on ``router``; each reads the
bridge's runtime from the app's state (``request.app.state.runtime``, set by bridge/app.py).
"""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

import grpc
from fastapi import APIRouter, Header, Query, Request, Security
from fastapi.security import APIKeyHeader, HTTPBearer
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage

from bridge import mapping
from bridge.credentials import DEFAULT_MAX_CREDENTIAL_BYTES, InvalidCredential, credential_from_headers
from bridge.errors import HubError, calling_server
from bridge.runtime import BridgeRuntime, Credential, credential_metadata
from bridge.schemas import (
    ActivityFeedBody,
    ActivityQueryBody,
    AgentsPageBody,
    AgentStatusBody,
    CollaborationBody,
    CollaborationsBody,
    CompleteActivityBody,
    DecisionsPageBody,
    EndCollaborationBody,
    MemoryUpdatesPageBody,
    OneActivityBody,
    RecordActivityBody,
    RecordDecisionBody,
    RecordedActivityBody,
    RecordedDecisionBody,
    RecordMemoryUpdateBody,
    SessionChangeBody,
    StartCollaborationBody,
    SuccessBody,
    documented,
)
from collab_grpc.names import (
    ACTIVITY_STATUSES,
    ACTIVITY_TYPES,
    MEMORY_OPERATIONS,
    ActivityStatusName,
    ActivityTypeName,
)
from collab_grpc.v1 import collaboration_pb2 as pb

__all__ = ["CREDENTIALS", "credential_from_request", "router"]

log = logging.getLogger("bridge.rest")


def credential_from_request(request: Request, max_bytes: int = DEFAULT_MAX_CREDENTIAL_BYTES) -> Credential:
    """Read the caller's credential (bridge/credentials.py), raising a 401 HubError for a malformed one."""
    try:
        return credential_from_headers(request.scope["headers"], max_bytes=max_bytes)
    except InvalidCredential as refused:
        log.info("credential refused", extra={"path": request.url.path, "reason": str(refused)})
        raise HubError(401, "UNAUTHENTICATED", f"invalid credential: {refused}") from None


# The server's limit (collab_grpc.validation.Limits.max_metadata_depth). Checked here
# too because a little deeper a Struct cannot even be encoded: protobuf's decoder stops
# at 100 nested messages, about 33 levels of JSON objects.
MAX_METADATA_DEPTH = 32

Message = TypeVar("Message", bound=ProtoMessage)


def _metadata_problem(data: dict[str, Any]) -> str | None:
    """Say what keeps ``data`` from being sent as metadata, if anything; walked level by
    level (not recursively), so no nesting can exhaust the stack."""
    level: list[Any] = [data]
    for depth in range(1, MAX_METADATA_DEPTH + 2):
        if not level:
            return None
        if depth > MAX_METADATA_DEPTH:
            return f"metadata is nested deeper than {MAX_METADATA_DEPTH} levels"
        children: list[Any] = []
        for container in level:
            for value in container.values() if isinstance(container, dict) else container:
                if isinstance(value, dict | list):
                    children.append(value)
                elif isinstance(value, float) and not math.isfinite(value):
                    return "metadata must not contain NaN or infinite numbers"
        level = children
    return None


def _struct(data: dict[str, Any]) -> struct_pb2.Struct:
    """Convert the caller's ``metadata`` to a Struct, refusing (400) what the hub cannot store."""
    if problem := _metadata_problem(data):
        raise HubError(400, "INVALID_ARGUMENT", problem)
    struct = struct_pb2.Struct()
    try:
        struct.update(data)
    except (TypeError, ValueError, OverflowError) as exc:  # an integer beyond a double, ...
        raise HubError(400, "INVALID_ARGUMENT", f"metadata is not a JSON object the hub can store: {exc}") from None
    return struct


def _message(kind: type[Message], **fields: Any) -> Message:
    """Build the request for the server from what the caller sent. The body fits the
    route's schema, yet protobuf can still refuse a value (a string with a lone surrogate
    from a JSON escape, which is not UTF-8): that is the caller's input, so 400."""
    try:
        return kind(**fields)
    except (TypeError, ValueError, DecodeError) as exc:
        raise HubError(400, "INVALID_ARGUMENT", f"the request cannot be encoded for the server: {exc}") from None


IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="A retried write with the same key returns the first answer and records nothing new.",
    ),
]
Limit = Annotated[int, Query(ge=1, le=500, description="1 to 500")]
OptionalLimit = Annotated[int | None, Query(ge=1, le=500, description="1 to 500; none: as many as fit")]
Cursor = Annotated[
    str | None,
    Query(max_length=4096, description="the `next_cursor` of the previous page: continue after it"),
]
# The history search's query parameters.
Repeated = Annotated[list[str] | None, Query(description="may repeat: any of the values")]
TimeBound = Annotated[
    str | None, Query(max_length=64, description="epoch seconds or ISO 8601 (UTC unless it says otherwise)")
]
# Epoch seconds the server's Timestamp can hold (years 1 to 9999).
_EARLIEST, _LATEST = -62_135_596_800.0, 253_402_300_799.0


def _seconds(field: str, text: str) -> float:
    """``since``/``until`` as epoch seconds: a number, or an ISO 8601 time."""
    try:
        seconds = float(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text)
            seconds = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
        except (ValueError, OverflowError):  # not a time, or one beyond what a datetime holds
            raise HubError(
                400, "INVALID_ARGUMENT", f"{field} must be epoch seconds or an ISO 8601 time, got {text!r:.80}"
            ) from None
    if not (math.isfinite(seconds) and _EARLIEST <= seconds <= _LATEST):
        raise HubError(400, "INVALID_ARGUMENT", f"{field} must be a time between the years 1 and 9999, got {text!r}")
    return seconds


def _metadata_match(pair: str) -> pb.MetadataMatch:
    """Parse one ``meta=key=value`` query parameter, refusing (400) one without ``=`` or a key."""
    key, equals, value = pair.partition("=")
    if not equals or not key:
        raise HubError(400, "INVALID_ARGUMENT", f"meta must be key=value, got {pair!r:.80}")
    return _message(pb.MetadataMatch, key=key, value=value)


# Declares the two ways to send a token in the OpenAPI spec (either one; /docs offers
# both). They check nothing: the server does, on the call each route makes.
CREDENTIALS = [
    Security(HTTPBearer(auto_error=False, description="Authorization: Bearer <token>")),
    Security(APIKeyHeader(name="X-API-Key", auto_error=False, description="the token itself")),
]


router = APIRouter(prefix="/api/v1/collaboration", tags=["collaboration"], dependencies=CREDENTIALS)


async def call(request: Request, method: str, message: Any) -> Any:
    """Call ``method`` of the server with the caller's credential, raising HubError when
    it refuses and ServerUnavailable when it cannot be reached."""
    runtime: BridgeRuntime = request.app.state.runtime
    metadata = credential_metadata(credential_from_request(request, runtime.config.max_credential_bytes))
    try:
        with calling_server():
            return await getattr(runtime.stub, method)(message, metadata=metadata, timeout=runtime.config.rpc_timeout)
    except grpc.aio.AioRpcError as failure:
        raise HubError.from_rpc(failure) from None


@router.get(
    "/agent-status",
    summary="Agent status: counts and each agent's state",
    response_model=None,
    responses=documented(AgentStatusBody),
)
async def agent_status(request: Request) -> dict[str, Any]:
    reply = await call(request, "GetAgentStatus", pb.GetAgentStatusRequest())
    return mapping.agent_status_json(reply.agent_status)


@router.get(
    "/agents",
    summary="Every agent, a page at a time, in agent_id order",
    response_model=None,
    responses=documented(AgentsPageBody, 400),
)
async def list_agents(request: Request, limit: Limit = 50, cursor: Cursor = None) -> dict[str, Any]:
    reply = await call(request, "ListAgents", _message(pb.ListAgentsRequest, limit=limit, cursor=cursor or ""))
    return {
        "agents": mapping.agents_json(reply.agents),
        "total": reply.total,
        "next_cursor": reply.next_cursor or None,
    }


@router.get(
    "/activity-feed",
    summary="The newest activities, newest first",
    response_model=None,
    responses=documented(ActivityFeedBody, 400),
)
async def activity_feed(
    request: Request,
    agent_id: str | None = None,
    limit: Limit = 50,
    session_id: str | None = None,
    cursor: Cursor = None,
) -> dict[str, Any]:
    message = _message(
        pb.GetActivityFeedRequest,
        agent_id=agent_id or "",
        limit=limit,
        session_id=session_id or "",
        cursor=cursor or "",
    )
    reply = await call(request, "GetActivityFeed", message)
    return {
        "activities": [mapping.activity_json(a) for a in reply.activities],
        "total": reply.total,
        "agent_id": agent_id,
        "next_cursor": reply.next_cursor or None,
    }


# `/activities` itself: the route below needs a `/` and an id after it, so neither
# shadows the other.
@router.get(
    "/activities",
    summary="Search the retained history: filters, newest or oldest first, a page at a time",
    response_model=None,
    responses=documented(ActivityQueryBody, 400),
)
async def query_activities(
    request: Request,
    agent_id: Repeated = None,
    department: Repeated = None,
    activity_type: Annotated[list[ActivityTypeName] | None, Query(description="may repeat")] = None,
    status: Annotated[list[ActivityStatusName] | None, Query(description="may repeat")] = None,
    session_id: Repeated = None,
    parent_activity_id: Repeated = None,
    since: TimeBound = None,
    until: TimeBound = None,
    order: Annotated[Literal["desc", "asc"], Query(description="newest (desc) or oldest (asc) first")] = "desc",
    limit: Limit = 50,
    cursor: Cursor = None,
    meta: Annotated[
        list[str] | None,
        Query(description="`key=value`: a top-level metadata key with this scalar value; may repeat"),
    ] = None,
) -> dict[str, Any]:
    message = _message(
        pb.QueryActivitiesRequest,
        agent_ids=agent_id or [],
        departments=department or [],
        activity_types=[ACTIVITY_TYPES[name] for name in activity_type or []],
        statuses=[ACTIVITY_STATUSES[name] for name in status or []],
        session_ids=session_id or [],
        parent_activity_ids=parent_activity_id or [],
        metadata=[_metadata_match(pair) for pair in meta or []],
        oldest_first=order == "asc",
        limit=limit,
        cursor=cursor or "",
    )
    for field, bound in (("since", since), ("until", until)):
        if bound is not None:
            getattr(message, field).FromNanoseconds(round(_seconds(field, bound) * 1e9))
    reply = await call(request, "QueryActivities", message)
    return {
        "activities": [mapping.activity_json(a) for a in reply.activities],
        "next_cursor": reply.next_cursor or None,
    }


# Path routes take any id the server accepts, `/` included: percent-encoded, it
# arrives decoded, and `:path` lets it span segments.
@router.get(
    "/activities/{activity_id:path}",
    summary="One activity, open or in history",
    response_model=None,
    responses=documented(OneActivityBody, 400, 404),
)
async def get_activity(request: Request, activity_id: str) -> dict[str, Any]:
    reply = await call(request, "GetActivity", _message(pb.GetActivityRequest, activity_id=activity_id))
    return {"activity": mapping.activity_json(reply.activity)}


@router.get(
    "/active-collaborations",
    summary="Collaboration sessions not yet ended",
    response_model=None,
    responses=documented(CollaborationsBody, 400),
)
async def active_collaborations(request: Request, limit: OptionalLimit = None, cursor: Cursor = None) -> dict[str, Any]:
    message = _message(pb.ListActiveCollaborationsRequest, limit=limit or 0, cursor=cursor or "")
    reply = await call(request, "ListActiveCollaborations", message)
    return {
        "collaborations": [mapping.session_json(s) for s in reply.collaborations],
        "total": reply.total,
        "next_cursor": reply.next_cursor or None,
    }


@router.get(
    "/ended-collaborations",
    summary="Ended sessions, most recently ended first",
    response_model=None,
    responses=documented(CollaborationsBody, 400),
)
async def ended_collaborations(request: Request, limit: Limit = 50, cursor: Cursor = None) -> dict[str, Any]:
    message = _message(pb.ListEndedCollaborationsRequest, limit=limit, cursor=cursor or "")
    reply = await call(request, "ListEndedCollaborations", message)
    return {
        "collaborations": [mapping.session_json(s) for s in reply.collaborations],
        "total": reply.total,
        "next_cursor": reply.next_cursor or None,
    }


@router.get(
    "/memory-updates",
    summary="The newest memory updates the hub's event log retains, newest first, a page at a time",
    response_model=None,
    responses=documented(MemoryUpdatesPageBody, 400),
)
async def memory_updates(
    request: Request, agent_id: str | None = None, limit: Limit = 50, cursor: Cursor = None
) -> dict[str, Any]:
    message = _message(pb.ListMemoryUpdatesRequest, agent_id=agent_id or "", limit=limit, cursor=cursor or "")
    reply = await call(request, "ListMemoryUpdates", message)
    return {
        "memory_updates": [{"seq": u.seq, "update": mapping.memory_update_json(u.update)} for u in reply.updates],
        "next_cursor": reply.next_cursor or None,
        "oldest_retained_seq": reply.oldest_retained_seq,
        "epoch": reply.epoch,
    }


# Before the session route: its `:path` would take `.../decisions` as a session id.
@router.get(
    "/collaborations/{session_id:path}/decisions",
    summary="A session's decisions, oldest first, a page at a time",
    response_model=None,
    responses=documented(DecisionsPageBody, 400, 404),
)
async def list_decisions(request: Request, session_id: str, limit: Limit = 50, cursor: Cursor = None) -> dict[str, Any]:
    message = _message(pb.ListDecisionsRequest, session_id=session_id, limit=limit, cursor=cursor or "")
    reply = await call(request, "ListDecisions", message)
    return {
        "decisions": [mapping.decision_json(d) for d in reply.decisions],
        "total": reply.total,
        "next_cursor": reply.next_cursor or None,
    }


@router.get(
    "/collaborations/{session_id:path}",
    summary="One session with its activities and decisions",
    response_model=None,
    responses=documented(CollaborationBody, 400, 404),
)
async def get_collaboration(request: Request, session_id: str) -> dict[str, Any]:
    reply = await call(request, "GetCollaboration", _message(pb.GetCollaborationRequest, session_id=session_id))
    return {
        "session": mapping.session_json(reply.session),
        "activities": [mapping.activity_json(a) for a in reply.activities],
        "decisions": [mapping.decision_json(d) for d in reply.decisions],
        "activities_omitted": reply.activities_omitted,
        "decisions_omitted": reply.decisions_omitted,
    }


@router.post(
    "/record-activity",
    summary="Record an activity",
    response_model=None,
    responses=documented(RecordedActivityBody, 400, 404, 409, 429),
)
async def record_activity(
    request: Request, body: RecordActivityBody, idempotency_key: IdempotencyKey = None
) -> dict[str, Any]:
    message = _message(
        pb.RecordActivityRequest,
        agent_id=body.agent_id,
        department=body.department,
        activity_type=ACTIVITY_TYPES[body.activity_type],
        metadata=_struct(body.metadata),
        related_agents=body.related_agents,
        session_id=body.session_id or "",
        parent_activity_id=body.parent_activity_id or "",
        idempotency_key=idempotency_key or "",
    )
    reply = await call(request, "RecordActivity", message)
    return {"success": True, "activity_id": reply.activity_id}


@router.post(
    "/complete-activity",
    summary="Complete an activity",
    response_model=None,
    responses=documented(RecordedActivityBody, 400, 404, 409),
)
async def complete_activity(
    request: Request, body: CompleteActivityBody, idempotency_key: IdempotencyKey = None
) -> dict[str, Any]:
    message = _message(
        pb.CompleteActivityRequest,
        activity_id=body.activity_id,
        success=body.success,
        failure_reason=body.failure_reason or "",
        metadata=_struct(body.metadata),
        idempotency_key=idempotency_key or "",
    )
    reply = await call(request, "CompleteActivity", message)
    return {"success": True, "activity_id": reply.activity_id}


@router.post(
    "/start-collaboration",
    summary="Start a collaboration session",
    response_model=None,
    responses=documented(SessionChangeBody, 400, 409),
)
async def start_collaboration(
    request: Request, body: StartCollaborationBody, idempotency_key: IdempotencyKey = None
) -> dict[str, Any]:
    message = _message(
        pb.StartCollaborationRequest,
        participants=body.participants,
        session_type=body.session_type,
        metadata=_struct(body.metadata),
        idempotency_key=idempotency_key or "",
    )
    reply = await call(request, "StartCollaboration", message)
    return {"success": True, "session_id": reply.session_id}


@router.post(
    "/end-collaboration",
    summary="End a collaboration session",
    response_model=None,
    responses=documented(SessionChangeBody, 400, 404, 409),
)
async def end_collaboration(
    request: Request, body: EndCollaborationBody, idempotency_key: IdempotencyKey = None
) -> dict[str, Any]:
    message = _message(pb.EndCollaborationRequest, session_id=body.session_id, idempotency_key=idempotency_key or "")
    reply = await call(request, "EndCollaboration", message)
    return {"success": True, "session_id": reply.session_id}


@router.post(
    "/record-memory-update",
    summary="Record a memory write, read or delete",
    response_model=None,
    responses=documented(SuccessBody, 400, 409, 429),
)
async def record_memory_update(
    request: Request, body: RecordMemoryUpdateBody, idempotency_key: IdempotencyKey = None
) -> dict[str, Any]:
    message = _message(
        pb.RecordMemoryUpdateRequest,
        operation=MEMORY_OPERATIONS[body.operation],
        item_id=body.item_id,
        agent_id=body.agent_id,
        metadata=_struct(body.metadata),
        idempotency_key=idempotency_key or "",
    )
    await call(request, "RecordMemoryUpdate", message)
    return {"success": True}


@router.post(
    "/record-decision",
    summary="Record a decision in an active session",
    response_model=None,
    responses=documented(RecordedDecisionBody, 400, 404, 409, 429),
)
async def record_decision(
    request: Request, body: RecordDecisionBody, idempotency_key: IdempotencyKey = None
) -> dict[str, Any]:
    message = _message(
        pb.RecordDecisionRequest,
        session_id=body.session_id,
        agent_id=body.agent_id,
        decision=body.decision,
        rationale=body.rationale,
        votes=body.votes,
        metadata=_struct(body.metadata),
        idempotency_key=idempotency_key or "",
    )
    reply = await call(request, "RecordDecision", message)
    return {"success": True, "decision_id": reply.decision_id}
