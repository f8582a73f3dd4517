"""collab_grpc: the collab hub's gRPC server.

The domain core (``model``, ``state``, ``events``, ``validation``, ``idempotency``,
``ratelimit``, ``auth``, ``history``, ``otlp``) imports no grpc and is tested directly;
``servicer``, ``interceptors`` and ``server`` put it on the wire; ``v1`` is the generated
code and ``names`` the guide's names for its enums; ``extras`` what the hub's commands need
beyond the SDK. The names below are imported when first used, so importing the generated
code (``collab_grpc.v1``, as the SDK does) loads nothing of the server.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

# Each name and the module it is imported from on first use.
_EXPORTS = {
    "ActivityStatus": "collab_grpc.model",
    "ActivityType": "collab_grpc.model",
    "CollabError": "collab_grpc.errors",
    "CollaborationState": "collab_grpc.state",
    "EventFilter": "collab_grpc.events",
    "EventKind": "collab_grpc.model",
    "EventLog": "collab_grpc.events",
    "FailedPrecondition": "collab_grpc.errors",
    "InvalidArgument": "collab_grpc.errors",
    "MemoryOperation": "collab_grpc.model",
    "NotFound": "collab_grpc.errors",
    "PermissionDenied": "collab_grpc.errors",
    "RateLimited": "collab_grpc.errors",
    "RosterEntry": "collab_grpc.state",
    "StateSettings": "collab_grpc.state",
    "Subscription": "collab_grpc.events",
    "Unauthenticated": "collab_grpc.errors",
}

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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'collab_grpc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups do not come here
    return value
