"""The client side of the WebSocket protocol, without I/O: parse what a client sent and
decide the reply (``pong``, ``subscribed`` or ``error``) and the client's new filter.

Subscribe semantics (the rule the WebSocket protocol's documentation gives clients):
message type names select message types; the activity type names that are not also
message types narrow ``agent_activity`` (and ``activity_completed`` and
``activity_linked``) to those types and imply ``agent_activity``;
``collaboration_started`` and ``collaboration_ended`` are both, and mean the message types.
An empty list means everything again.
"""

from __future__ import annotations

import json
from typing import Any

from bridge.fanout import ClientFilter
from bridge.mapping import JSON, iso_now
from collab_grpc.names import ACTIVITY_TYPES

__all__ = ["ACTIVITY_ONLY_TYPES", "MESSAGE_TYPES", "error", "handle_client_message", "in_force", "subscribe"]

# Messages a client can select with `subscribe`; the connection's first two are always sent.
MESSAGE_TYPES = frozenset(
    {
        "agent_activity",
        "activity_completed",
        "agent_status_update",
        "memory_update",
        "collaboration_started",
        "collaboration_ended",
        "decision_recorded",
        "agent_retired",
        "activity_linked",
    }
)
ACTIVITY_ONLY_TYPES = frozenset(ACTIVITY_TYPES) - MESSAGE_TYPES


# An error names at most this many of a client's unknown names, each cut to NAME_SHOWN
# characters: the reply stays small whatever the client sent.
MAX_NAMES_SHOWN = 10
NAME_SHOWN = 64


def _shown(name: str) -> str:
    """Quote a client's name as an error shows it: escaped unless printable (a JSON escape
    such as "\\ud800" decodes to a lone surrogate, which no UTF-8 frame can carry)."""
    cut = name[:NAME_SHOWN] + ("..." if len(name) > NAME_SHOWN else "")
    return cut if cut.isprintable() else ascii(cut)


def error(text: str, **extra: Any) -> JSON:
    """Build an `error` message saying ``text``, with ``extra`` fields beside it."""
    return {"type": "error", "error": text, "timestamp": iso_now(), **extra}


def in_force(current: ClientFilter) -> list[str]:
    """List the names a `subscribed` reply gives: what the client now receives."""
    names = set(MESSAGE_TYPES if current.message_types is None else current.message_types)
    if current.activity_types is not None:
        names |= current.activity_types
    return sorted(names)


def subscribe(names: list[str], current: ClientFilter) -> tuple[JSON, ClientFilter]:
    """Return the reply to a subscription to ``names`` (`subscribed`, or an `error` naming
    the unknown ones) and the filter in force after it; the WebSocket's `subscribe` message
    and the event stream's ``?types=`` both come here."""
    unknown = sorted(set(names) - MESSAGE_TYPES - ACTIVITY_ONLY_TYPES)
    if unknown:
        shown = ", ".join(_shown(name) for name in unknown[:MAX_NAMES_SHOWN])
        if len(unknown) > MAX_NAMES_SHOWN:
            shown += f" and {len(unknown) - MAX_NAMES_SHOWN} more"
        return (
            error(
                f"unknown type names: {shown}",
                valid=sorted(MESSAGE_TYPES | ACTIVITY_ONLY_TYPES),
            ),
            current,
        )
    if not names:
        chosen = ClientFilter()
    else:
        message_types = {name for name in names if name in MESSAGE_TYPES}
        activity_types = {name for name in names if name in ACTIVITY_ONLY_TYPES}
        if activity_types:
            message_types.add("agent_activity")
        chosen = ClientFilter(frozenset(message_types), frozenset(activity_types) or None)
    reply = {"type": "subscribed", "activity_types": in_force(chosen), "timestamp": iso_now()}
    return reply, chosen


def handle_client_message(
    text: str | None, data: bytes | None, current: ClientFilter, max_bytes: int
) -> tuple[JSON, ClientFilter]:
    """Return the reply to one client message and the filter in force after it."""
    if text is None:
        size = len(data or b"")
        return error(f"binary frames are not supported ({size} bytes received); send JSON text"), current
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        return error(f"message is {size} bytes; the limit is {max_bytes}"), current
    try:
        message = json.loads(text)
    except ValueError as exc:
        return error(f"message is not valid JSON: {exc}"), current
    except RecursionError:  # json's C decoder recurses per level: "[[[[..." within the size limit
        return error("message is nested too deeply to decode"), current
    if not isinstance(message, dict):
        return error("message must be a JSON object with a `type`"), current
    kind = message.get("type")
    if kind == "ping":
        return {"type": "pong", "timestamp": iso_now()}, current
    if kind == "subscribe":
        names = message.get("activity_types")
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            return error("subscribe needs `activity_types`: a list of message or activity type names"), current
        return subscribe(names, current)
    if not isinstance(kind, str):
        return error("message needs a string `type`: `ping` or `subscribe`"), current
    shown = repr(kind[:NAME_SHOWN]) + ("..." if len(kind) > NAME_SHOWN else "")
    return error(f"unknown message type {shown}; expected `ping` or `subscribe`"), current
