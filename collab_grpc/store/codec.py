"""Domain objects to JSON and back, for what a store writes."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import orjson

from collab_grpc.model import (
    Activity,
    ActivityCompletion,
    ActivityLink,
    ActivityStatus,
    ActivityType,
    AgentRetirement,
    Decision,
    EventKind,
    EventPayload,
    MemoryOperation,
    MemoryUpdate,
    Session,
)

__all__ = [
    "decode_activity",
    "decode_payload",
    "decode_payload_data",
    "decode_session",
    "dumps",
    "encode",
    "encode_rows",
]


# One encoder: json.dumps with any non-default option builds a new one on every call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def dumps(value: Any) -> str:
    return _ENCODER.encode(value)


def encode(payload: EventPayload) -> str:
    """A payload as JSON text. orjson writes the dataclass directly (an activity costs a
    seventh of the json module's time, and one is encoded for every event stored); what
    it refuses (in metadata given through the Python API: an integer beyond 64 bits, a
    key that is not a string; validation refuses a lone surrogate, which neither could
    store) takes the json module's path, as before.
    The text may differ from the json module's (``0.00001`` for ``1e-05``); the JSON is
    the same."""
    try:
        return orjson.dumps(payload).decode()
    except orjson.JSONEncodeError:
        return dumps(_fields(payload))


def encode_rows(rows: Sequence[Sequence[Any]]) -> str:
    """Rows of plain values, enums and payloads as one JSON array, each payload an
    object in it written as ``encode`` writes it: a row orjson refuses takes the json
    module's path (the rest of the array is not rewritten for it)."""
    try:
        return orjson.dumps(rows).decode()
    except orjson.JSONEncodeError:
        return f"[{','.join(_encode_row(row) for row in rows)}]"


def _encode_row(row: Sequence[Any]) -> str:
    try:
        return orjson.dumps(row).decode()
    except orjson.JSONEncodeError:
        return dumps([_fields(item) if type(item) in _FIELD_NAMES else item for item in row])


def _fields(value: Any) -> dict[str, Any]:
    """A payload's fields as a dict, nested payloads too: what ``dataclasses.asdict``
    gives for JSON, without its deep copy of every list and dict (json.dumps only reads
    them; that copy was most of the cost of encoding an activity)."""
    fields = {name: getattr(value, name) for name in _FIELD_NAMES[type(value)]}
    for name, item in fields.items():
        if type(item) in _FIELD_NAMES:
            fields[name] = _fields(item)
    return fields


_FIELD_NAMES: dict[type, tuple[str, ...]] = {
    kind: tuple(field.name for field in dataclasses.fields(kind))
    for kind in (Activity, ActivityCompletion, ActivityLink, AgentRetirement, Decision, MemoryUpdate, Session)
}


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
    return decode_payload_data(kind, json.loads(text))


def decode_payload_data(kind: EventKind, data: Any) -> EventPayload:
    """A payload from its JSON, already parsed."""
    if kind is EventKind.ACTIVITY_RECORDED:
        return decode_activity(data)
    if kind is EventKind.ACTIVITY_COMPLETED:
        # Events stored before completions carried metadata have no "added_keys".
        return ActivityCompletion(decode_activity(data["activity"]), data["success"], data.get("added_keys") or [])
    if kind is EventKind.MEMORY_UPDATED:
        return MemoryUpdate(**{**data, "operation": MemoryOperation(data["operation"])})
    if kind in (EventKind.COLLABORATION_STARTED, EventKind.COLLABORATION_ENDED):
        return decode_session(data)
    if kind is EventKind.AGENT_RETIRED:
        return AgentRetirement(**data)
    if kind is EventKind.ACTIVITY_LINKED:
        return ActivityLink(decode_activity(data["activity"]))
    return Decision(**data)
