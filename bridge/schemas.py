"""What the REST routes take and answer, as pydantic models: the OpenAPI spec at /openapi.json.

The request bodies (``RecordActivityBody``...) are validated strictly: unknown fields and
values of another JSON type are refused with 422.

The routes build their answers with bridge.mapping and return them as they are; these
models only document them (no validation on the way out, so a body is never reshaped),
and tests/integration/test_fuzz_rest.py checks every answer against them. They allow
extra properties: the guide's shapes are the floor, fields are added, never removed.

Every error, whatever the route, is ``{"detail": "<what is wrong>", "code": "<STATUS>"}``
except 422, which is FastAPI's list of what does not fit the route's schema.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from collab_grpc.names import ActivityStatusName, ActivityTypeName, MemoryOperationName

__all__ = [
    "ActivityBody",
    "ActivityFeedBody",
    "ActivityTypeName",
    "AgentEntry",
    "AgentStatusBody",
    "AgentsPageBody",
    "CollaborationBody",
    "CollaborationsBody",
    "CompleteActivityBody",
    "DecisionBody",
    "DecisionsPageBody",
    "EndCollaborationBody",
    "ErrorBody",
    "HealthBody",
    "MemoryUpdateBody",
    "MemoryUpdatesPageBody",
    "OneActivityBody",
    "ReadyBody",
    "RecordActivityBody",
    "RecordDecisionBody",
    "RecordMemoryUpdateBody",
    "RecordedActivityBody",
    "RecordedDecisionBody",
    "RecordedMemoryUpdateBody",
    "SessionBody",
    "SessionChangeBody",
    "StartCollaborationBody",
    "SuccessBody",
    "documented",
]


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorBody(_Body):
    detail: str
    code: str


class AgentEntry(_Body):
    status: Literal["active", "idle"]
    current_activity: str | None
    last_activity: str | None
    collaboration_count: int
    department: str


class AgentStatusBody(_Body):
    total_agents: int
    active_agents: int
    idle_agents: int
    active_activities: int
    active_collaborations: int
    # Capped by a count and the server's reply budget (active agents first); the counts
    # above stay exact and GET /agents pages through every agent.
    agents: dict[str, AgentEntry]
    agents_omitted: int = 0


class AgentsPageBody(_Body):
    """A page of every agent the hub knows, in agent_id order."""

    agents: dict[str, AgentEntry]
    total: int
    next_cursor: str | None


class ActivityBody(_Body):
    activity_id: str
    agent_id: str
    department: str
    activity_type: ActivityTypeName
    timestamp: float
    metadata: dict[str, Any]
    related_agents: list[str]
    status: ActivityStatusName
    session_id: str | None
    parent_activity_id: str | None
    # Only once completed (failure_reason only when it failed with one).
    completed_at: float | None = None
    failure_reason: str | None = None


class SessionBody(_Body):
    session_id: str
    participants: list[str]
    session_type: str
    started_at: str
    ended_at: str | None
    activity_count: int
    decision_count: int
    metadata: dict[str, Any]


class DecisionBody(_Body):
    decision_id: str
    session_id: str
    agent_id: str
    decision: str
    rationale: str
    votes: dict[str, str]
    metadata: dict[str, Any]
    timestamp: float


class ActivityFeedBody(_Body):
    activities: list[ActivityBody]
    total: int
    agent_id: str | None
    # Set when more activities follow (the page reached `limit` or the reply budget).
    next_cursor: str | None = None


class ActivityQueryBody(_Body):
    """A page of the history search, in (timestamp, activity_id) order."""

    activities: list[ActivityBody]
    # Set when more activities may follow: pass it as `cursor` (with the same filters).
    next_cursor: str | None = None


class OneActivityBody(_Body):
    activity: ActivityBody


class CollaborationsBody(_Body):
    collaborations: list[SessionBody]
    total: int
    next_cursor: str | None = None


class CollaborationBody(_Body):
    session: SessionBody
    activities: list[ActivityBody]
    decisions: list[DecisionBody]
    # The newest ones the reply budget left out: activity-feed?session_id= and
    # collaborations/{session_id}/decisions read them all.
    activities_omitted: int = 0
    decisions_omitted: int = 0


class DecisionsPageBody(_Body):
    decisions: list[DecisionBody]
    total: int
    next_cursor: str | None


class MemoryUpdateBody(_Body):
    operation: MemoryOperationName
    item_id: str
    agent_id: str
    timestamp: float
    metadata: dict[str, Any]


class RecordedMemoryUpdateBody(_Body):
    seq: int = Field(description="the seq of the event that announced it (the WebSocket's `memory_update` carries it)")
    update: MemoryUpdateBody


class MemoryUpdatesPageBody(_Body):
    memory_updates: list[RecordedMemoryUpdateBody] = Field(description="newest first")
    next_cursor: str | None
    oldest_retained_seq: int = Field(description="updates announced before this event seq are no longer served")
    epoch: str


class SuccessBody(_Body):
    success: Literal[True]


class RecordedActivityBody(SuccessBody):
    activity_id: str


class SessionChangeBody(SuccessBody):
    session_id: str


class RecordedDecisionBody(SuccessBody):
    decision_id: str


class HealthBody(_Body):
    status: Literal["ok"]


class ReadyBody(_Body):
    ready: bool
    epoch: str
    seq: int
    clients: int
    error: str | None


# What the REST routes take: exactly these fields, each of exactly its JSON type (no
# coercion), so a typo in a field name is a 422, not a silently ignored field.
class _RequestBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class RecordActivityBody(_RequestBody):
    agent_id: str
    activity_type: ActivityTypeName
    department: str = ""
    metadata: dict[str, Any] = Field(default_factory=dict)
    related_agents: list[str] = Field(default_factory=list)
    session_id: str | None = None
    parent_activity_id: str | None = None


class CompleteActivityBody(_RequestBody):
    activity_id: str
    success: bool = True
    failure_reason: str | None = None
    # Keys merged into the activity's metadata (token usage, the response model...).
    metadata: dict[str, Any] = Field(default_factory=dict)


class StartCollaborationBody(_RequestBody):
    participants: list[str]
    session_type: str = "general"
    metadata: dict[str, Any] = Field(default_factory=dict)


class EndCollaborationBody(_RequestBody):
    session_id: str


class RecordMemoryUpdateBody(_RequestBody):
    operation: MemoryOperationName
    item_id: str
    agent_id: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class RecordDecisionBody(_RequestBody):
    session_id: str
    agent_id: str
    decision: str
    rationale: str = ""
    votes: dict[str, str] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)


_ERRORS: dict[int, str] = {
    400: "The server refused the input (INVALID_ARGUMENT): bad ids, oversize metadata, ...",
    401: "No credential, or one the server does not accept",
    403: "The credential may not do this (a read-only key on a write)",
    404: "No such activity or session",
    409: "Already completed, session already ended, idempotency key reused for another request",
    413: "The request body is larger than the bridge accepts (COLLAB_MAX_BODY_BYTES)",
    429: "The agent is over its rate limit; retry after Retry-After seconds",
    502: "The server answered with an error the bridge does not map",
    503: "The server is unreachable or its store is unavailable; retry",
    504: "The server did not answer within the bridge's RPC timeout",
}
_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "Bearer", "required": True, "schema": {"type": "string"}}},
    429: {
        "Retry-After": {
            "description": "whole seconds to wait",
            "required": True,
            "schema": {"type": "string", "pattern": "^[0-9]+$"},
        }
    },
}
# Whatever a route does, these can happen: no or a wrong credential, a body over the cap,
# the server away or slow (or answering with a status the bridge does not map).
_ALWAYS = (401, 403, 413, 502, 503, 504)


def documented(body: type[BaseModel], *errors: int) -> dict[int | str, dict[str, Any]]:
    """A route's `responses`: 200 with ``body``, the errors every route may answer and ``errors``."""
    responses: dict[int | str, dict[str, Any]] = {200: {"model": body}}
    for status in sorted({*_ALWAYS, *errors}):
        responses[status] = {"model": ErrorBody, "description": _ERRORS[status]}
        if status in _HEADERS:
            responses[status]["headers"] = _HEADERS[status]
    return responses
