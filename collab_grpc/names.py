"""The guide's names for the values of collab.v1's enums and their numbers on the wire:
the one table each way that the server (convert.py), the bridge (mapping.py,
schemas.py), the SDK (collab._requests) and the CLI use.

A value's name is its proto name without the enum's prefix, in lower case
(``ACTIVITY_TYPE_TASK_ASSIGNED`` -> ``task_assigned``); ``*_UNSPECIFIED`` has none. The
names are written out once, as the Literal types below (pydantic's schemas and the type
checker need them spelled); each table takes its numbers from the generated enum, so a
name the proto lacks fails here, at import, and tests/collab_grpc/test_names.py checks
that every value of the proto has a name. The tables are read-only: they are shared.

Imports only the generated code (``collab_grpc.v1``), as the SDK may import nothing
of the server.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal, TypeVar, get_args

from collab_grpc.v1 import collaboration_pb2 as pb

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import _EnumTypeWrapper

__all__ = [
    "ACTIVITY_STATUSES",
    "ACTIVITY_STATUS_NAMES",
    "ACTIVITY_TYPES",
    "ACTIVITY_TYPE_NAMES",
    "EVENT_KINDS",
    "EVENT_KIND_NAMES",
    "MEMORY_OPERATIONS",
    "MEMORY_OPERATION_NAMES",
    "ActivityStatusName",
    "ActivityTypeName",
    "EventKindName",
    "MemoryOperationName",
]

ActivityTypeName = Literal[
    "agent_started",
    "agent_completed",
    "memory_write",
    "memory_read",
    "council_debate",
    "council_synthesis",
    "decision_made",
    "task_assigned",
    "task_completed",
    "message_sent",
    "collaboration_started",
    "collaboration_ended",
]
ActivityStatusName = Literal["active", "completed", "failed"]
MemoryOperationName = Literal["write", "read", "delete"]
EventKindName = Literal[
    "activity_recorded",
    "activity_completed",
    "memory_updated",
    "collaboration_started",
    "collaboration_ended",
    "decision_recorded",
    "agent_retired",
    "activity_linked",
]

Number = TypeVar("Number", bound=int)


def _numbers(names: object, enum: _EnumTypeWrapper[Number], prefix: str) -> Mapping[str, Number]:
    """Each name of the Literal type ``names`` -> the number of ``prefix`` + the name, upper-cased."""
    return MappingProxyType({name: enum.Value(prefix + name.upper()) for name in get_args(names)})


def _names(numbers: Mapping[str, Number]) -> Mapping[int, str]:
    return MappingProxyType({number: name for name, number in numbers.items()})


# Guide name -> proto number (requests), and back (replies and events).
ACTIVITY_TYPES = _numbers(ActivityTypeName, pb.ActivityType, "ACTIVITY_TYPE_")
ACTIVITY_TYPE_NAMES = _names(ACTIVITY_TYPES)
ACTIVITY_STATUSES = _numbers(ActivityStatusName, pb.ActivityStatus, "ACTIVITY_STATUS_")
ACTIVITY_STATUS_NAMES = _names(ACTIVITY_STATUSES)
MEMORY_OPERATIONS = _numbers(MemoryOperationName, pb.MemoryOperation, "MEMORY_OPERATION_")
MEMORY_OPERATION_NAMES = _names(MEMORY_OPERATIONS)
EVENT_KINDS = _numbers(EventKindName, pb.EventKind, "EVENT_KIND_")
EVENT_KIND_NAMES = _names(EVENT_KINDS)
