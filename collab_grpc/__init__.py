"""collab_grpc: the collab hub's gRPC server.

The domain core (``model``, ``state``, ``events``, ``validation``, ``idempotency``,
``ratelimit``, ``auth``) imports no grpc and is tested directly; ``servicer``,
``interceptors`` and ``server`` put it on the wire; ``v1`` is the generated code.
"""

from collab_grpc.errors import (
    CollabError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RateLimited,
    Unauthenticated,
)
from collab_grpc.events import EventFilter, EventLog, Subscription
from collab_grpc.model import ActivityStatus, ActivityType, EventKind, MemoryOperation
from collab_grpc.state import CollaborationState, RosterEntry, StateSettings

__all__ = [
    "ActivityStatus",
    "ActivityType",
    "CollabError",
    "CollaborationState",
    "EventFilter",
    "EventKind",
    "EventLog",
    "FailedPrecondition",
    "InvalidArgument",
    "MemoryOperation",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "RosterEntry",
    "StateSettings",
    "Subscription",
    "Unauthenticated",
]
