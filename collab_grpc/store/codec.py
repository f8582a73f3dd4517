"""Domain objects to JSON and back, for what a store writes."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from collab_grpc.model import (
    Activity,
    ActivityCompletion,
    ActivityStatus,
    ActivityType,
    Decision,
    EventKind,
    EventPayload,
    MemoryOperation,
    MemoryUpdate,
    Session,
)

__all__ = ["decode_activity", "decode_payload", "decode_session", "dumps", "encode"]


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def encode(payload: EventPayload) -> str:
    return dumps(dataclasses.asdict(payload))


def decode_activity(data: dict[str, Any]) -> Activity:
    return Activity(
        **{
            **data,
            "activity_type": ActivityType(data["activity_type"]),
            "status": ActivityStatus(data["status"]),
        }
    )


def decode_session(data: dict[str, Any]) -> Session:
    return Session(**data)


def decode_payload(kind: EventKind, text: str) -> EventPayload:
    data = json.loads(text)
    if kind is EventKind.ACTIVITY_RECORDED:
        return decode_activity(data)
    if kind is EventKind.ACTIVITY_COMPLETED:
        return ActivityCompletion(decode_activity(data["activity"]), data["success"])
    if kind is EventKind.MEMORY_UPDATED:
        return MemoryUpdate(**{**data, "operation": MemoryOperation(data["operation"])})
    if kind in (EventKind.COLLABORATION_STARTED, EventKind.COLLABORATION_ENDED):
        return decode_session(data)
    return Decision(**data)
