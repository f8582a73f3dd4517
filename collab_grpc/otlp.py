"""OpenTelemetry spans as the hub's records: the one mapping table every way in uses.

Pure: no grpc, no protobuf, no OpenTelemetry package. A span arrives here as a
`SpanView` (the OTLP servicer builds one from an OTLP span; an in-process integration
may build one from its framework's own events) and leaves as a `SpanPlan`: what to
record for it. Applying a plan to the state (ids, the tree, sessions, idempotency) is
the ingest's job (collab_grpc/otlp_servicer.py).

The table, keyed by the span's ``gen_ai.operation.name`` (OpenTelemetry GenAI semantic
conventions):

- ``invoke_agent``, ``create_agent``, ``invoke_workflow`` -> ``agent_started``
- ``execute_tool`` -> ``task_assigned``
- ``chat``, ``text_completion``, ``generate_content``, ``embeddings``,
  ``fetch_response`` -> ``message_sent`` (a message to a model)
- ``plan`` -> ``decision_made``
- ``handoff`` -> ``message_sent`` with ``related_agents`` = the agent handed to
  (``gen_ai.handoff.to_agent``); the conventions have no handoff yet, this follows the
  OpenAI Agents SDK's handoff span (``from_agent`` / ``to_agent``)
- ``send_message`` -> ``message_sent`` with ``related_agents`` = the agent written to
  (``gen_ai.handoff.to_agent``, from ``gen_ai.handoff.from_agent``): one message of a
  conversation between agents that is not a handoff (CrewAI's A2A messages); not a
  convention of OpenTelemetry's, which has no agent-to-agent message
- ``search_memory``, ``retrieval`` -> ``memory_read`` plus a memory update ``read``
- ``create_memory``, ``update_memory``, ``upsert_memory``, ``create_memory_store``
  -> ``memory_write`` plus a memory update ``write``
- ``delete_memory``, ``delete_memory_store`` -> ``memory_write`` plus a memory update
  ``delete``

Any other span (no ``gen_ai.operation.name``, or a value not above) is not GenAI: it is
counted and dropped, and a GenAI span under it hangs from its nearest GenAI ancestor.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from collab_grpc.model import ActivityType, MemoryOperation

__all__ = [
    "MAX_ATTRIBUTE_CHARS",
    "OPERATIONS",
    "Operation",
    "SpanPlan",
    "SpanView",
    "agent_id_from",
    "completion_metadata",
    "fit_metadata",
    "plan_span",
    "span_key",
]

# Longest string attribute kept in metadata; longer ones are cut (and marked).
MAX_ATTRIBUTE_CHARS = 256
# Most entries a list attribute (finish reasons...) keeps in metadata.
MAX_ATTRIBUTE_ITEMS = 16
# agent_id when a span names no agent and has no GenAI ancestor or service name.
DEFAULT_AGENT = "otel-agent"
MAX_AGENT_ID_CHARS = 128
MAX_FAILURE_CHARS = 1024

OPERATION = "gen_ai.operation.name"
AGENT_NAME = "gen_ai.agent.name"
AGENT_ID = "gen_ai.agent.id"
CONVERSATION_ID = "gen_ai.conversation.id"
HANDOFF_FROM = "gen_ai.handoff.from_agent"
HANDOFF_TO = "gen_ai.handoff.to_agent"
SERVICE_NAME = "service.name"
# Where a memory operation's item id is read from, first present wins (else the span id).
MEMORY_ITEM_ATTRIBUTES = ("gen_ai.memory.id", "gen_ai.memory.store.id", "gen_ai.memory.store.name")


@dataclass(frozen=True, slots=True)
class Operation:
    """What one ``gen_ai.operation.name`` becomes."""

    activity_type: ActivityType
    memory: MemoryOperation | None = None
    handoff: bool = False


OPERATIONS: dict[str, Operation] = {
    "invoke_agent": Operation(ActivityType.AGENT_STARTED),
    "create_agent": Operation(ActivityType.AGENT_STARTED),
    "invoke_workflow": Operation(ActivityType.AGENT_STARTED),
    "execute_tool": Operation(ActivityType.TASK_ASSIGNED),
    "chat": Operation(ActivityType.MESSAGE_SENT),
    "text_completion": Operation(ActivityType.MESSAGE_SENT),
    "generate_content": Operation(ActivityType.MESSAGE_SENT),
    "embeddings": Operation(ActivityType.MESSAGE_SENT),
    "fetch_response": Operation(ActivityType.MESSAGE_SENT),
    "plan": Operation(ActivityType.DECISION_MADE),
    "handoff": Operation(ActivityType.MESSAGE_SENT, handoff=True),
    "send_message": Operation(ActivityType.MESSAGE_SENT, handoff=True),
    "search_memory": Operation(ActivityType.MEMORY_READ, MemoryOperation.READ),
    "retrieval": Operation(ActivityType.MEMORY_READ, MemoryOperation.READ),
    "create_memory": Operation(ActivityType.MEMORY_WRITE, MemoryOperation.WRITE),
    "update_memory": Operation(ActivityType.MEMORY_WRITE, MemoryOperation.WRITE),
    "upsert_memory": Operation(ActivityType.MEMORY_WRITE, MemoryOperation.WRITE),
    "create_memory_store": Operation(ActivityType.MEMORY_WRITE, MemoryOperation.WRITE),
    "delete_memory": Operation(ActivityType.MEMORY_WRITE, MemoryOperation.DELETE),
    "delete_memory_store": Operation(ActivityType.MEMORY_WRITE, MemoryOperation.DELETE),
}

# Span attributes kept in the activity's metadata under their own names, in the order
# they are given up when the metadata must shrink to fit the hub's limit (last first).
KEPT_ATTRIBUTES = (
    OPERATION,
    AGENT_ID,
    AGENT_NAME,
    CONVERSATION_ID,
    "gen_ai.tool.name",
    "gen_ai.tool.call.id",
    "gen_ai.tool.type",
    "gen_ai.request.model",
    "gen_ai.response.model",
    "gen_ai.provider.name",
    "gen_ai.system",
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens",
    "gen_ai.response.finish_reasons",
    "gen_ai.response.id",
    "gen_ai.data_source.id",
    *MEMORY_ITEM_ATTRIBUTES,
    HANDOFF_FROM,
    HANDOFF_TO,
    "error.type",
)
# Metadata never given up: what ties the activity to its span.
ESSENTIAL_KEYS = ("source", "otel.trace_id", "otel.span_id")


@dataclass(frozen=True, slots=True)
class SpanView:
    """A span as the mapping reads it. Ids are lowercase hex (32 and 16 digits, as OTLP/JSON
    and W3C trace context write them); times are Unix nanoseconds, ``end_ns`` 0 while the
    span is still running (an in-process start)."""

    trace_id: str
    span_id: str
    name: str
    parent_span_id: str = ""
    start_ns: int = 0
    end_ns: int = 0
    error: bool = False
    status_message: str = ""
    attributes: Mapping[str, Any] = field(default_factory=dict)
    resource: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return span_key(self.trace_id, self.span_id)

    @property
    def parent_key(self) -> str:
        return span_key(self.trace_id, self.parent_span_id) if self.parent_span_id else ""

    @property
    def ended(self) -> bool:
        return self.end_ns > 0


@dataclass(frozen=True, slots=True)
class SpanPlan:
    """What a GenAI span becomes. ``agent_id`` empty: the agent of the span's GenAI
    ancestor (else ``fallback_agent_id``). ``failure_reason`` is set when the span ended
    with an error."""

    key: str
    parent_key: str
    activity_type: ActivityType
    agent_id: str
    fallback_agent_id: str
    metadata: dict[str, Any]
    related_agents: list[str]
    conversation_id: str
    memory: MemoryOperation | None
    memory_item_id: str
    ended: bool
    failure_reason: str


def span_key(trace_id: str, span_id: str) -> str:
    """The idempotency key of a span's records: ``<trace id>:<span id>`` in hex."""
    return f"{trace_id}:{span_id}"


def agent_id_from(name: object) -> str:
    """An attribute as an agent id: white space becomes ``_``, control characters are
    dropped, at most 128 characters (the hub's id rules); empty when nothing is left."""
    if not isinstance(name, str):
        return ""
    if name.isprintable() and " " not in name:  # already an id (the common case): no rebuilding
        return name[:MAX_AGENT_ID_CHARS]
    cleaned = "".join("_" if ch.isspace() else ch for ch in name if ch.isprintable() or ch.isspace())
    return cleaned[:MAX_AGENT_ID_CHARS]


def _kept(value: Any) -> Any:
    """An attribute value as bounded JSON: strings cut to MAX_ATTRIBUTE_CHARS, lists to
    MAX_ATTRIBUTE_ITEMS scalars; anything else (bytes, nested) as its cut repr."""
    if isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else str(value)
    if isinstance(value, str):
        return value if len(value) <= MAX_ATTRIBUTE_CHARS else value[: MAX_ATTRIBUTE_CHARS - 1] + "…"
    if isinstance(value, list | tuple):
        return [_kept(item) for item in value[:MAX_ATTRIBUTE_ITEMS] if not isinstance(item, list | tuple | dict)]
    return _kept(repr(value))


def _seconds(nanoseconds: int) -> float:
    return round(nanoseconds / 1e9, 6)


def plan_span(span: SpanView) -> SpanPlan | None:
    """The plan for a GenAI span; None for any other span (counted and dropped)."""
    attributes = span.attributes
    operation_name = attributes.get(OPERATION)
    operation = OPERATIONS.get(operation_name) if isinstance(operation_name, str) else None
    if operation is None:
        return None
    metadata: dict[str, Any] = {
        "source": "otel",
        "otel.trace_id": span.trace_id,
        "otel.span_id": span.span_id,
    }
    if span.parent_span_id:
        metadata["otel.parent_span_id"] = span.parent_span_id
    metadata["otel.span_name"] = _kept(span.name)
    # The hub stamps records with its own clock; the span's own times are kept here.
    if span.start_ns:
        metadata["otel.start_time"] = _seconds(span.start_ns)
    if span.ended:
        metadata["otel.end_time"] = _seconds(span.end_ns)
        if span.start_ns:
            metadata["otel.duration_ms"] = round((span.end_ns - span.start_ns) / 1e6, 3)
    for name in KEPT_ATTRIBUTES:
        if name in attributes:
            metadata[name] = _kept(attributes[name])
    service = span.resource.get(SERVICE_NAME)
    if isinstance(service, str) and service:
        metadata[SERVICE_NAME] = _kept(service)

    agent = agent_id_from(attributes.get(AGENT_NAME)) or agent_id_from(attributes.get(AGENT_ID))
    related: list[str] = []
    if operation.handoff:
        agent = agent_id_from(attributes.get(HANDOFF_FROM)) or agent
        target = agent_id_from(attributes.get(HANDOFF_TO))
        if target and target != agent:
            related.append(target)
    item_id = ""
    if operation.memory is not None:
        item_id = next(
            (agent_id_from(attributes[name]) for name in MEMORY_ITEM_ATTRIBUTES if agent_id_from(attributes.get(name))),
            span.span_id,
        )
    failure = ""
    if span.ended and span.error:
        error_type = attributes.get("error.type")
        failure = span.status_message or (error_type if isinstance(error_type, str) else "") or "error"
        # The hub's failure_reason: one line of printable text, at most 1,024 characters.
        failure = "".join(ch if ch.isprintable() else " " for ch in failure[:MAX_FAILURE_CHARS]).strip() or "error"
    conversation = attributes.get(CONVERSATION_ID)
    return SpanPlan(
        key=span.key,
        parent_key=span.parent_key,
        activity_type=operation.activity_type,
        agent_id=agent,
        fallback_agent_id=agent_id_from(service) or DEFAULT_AGENT,
        metadata=metadata,
        related_agents=related,
        conversation_id=_kept(conversation)[:MAX_AGENT_ID_CHARS] if isinstance(conversation, str) else "",
        memory=operation.memory,
        memory_item_id=item_id,
        ended=span.ended,
        failure_reason=failure,
    )


def fit_metadata(metadata: dict[str, Any], max_bytes: int) -> dict[str, Any] | None:
    """``metadata`` within ``max_bytes`` serialised (as the hub measures it): optional
    keys are given up, newest in KEPT_ATTRIBUTES order first, then the span's name and
    times; None when even the essential keys do not fit."""
    # orjson's UTF-8 is at most three times shorter than the escaped text the hub measures.
    try:
        if 3 * len(orjson.dumps(metadata)) <= max_bytes:
            return dict(metadata)
    except orjson.JSONEncodeError:  # what orjson refuses (an integer beyond 64 bits) is measured below
        pass
    fitted = dict(metadata)
    optional = [key for key in reversed(fitted) if key not in ESSENTIAL_KEYS]
    while len(json.dumps(fitted, separators=(",", ":"))) > max_bytes:
        if not optional:
            return None
        del fitted[optional.pop(0)]
    return fitted


def completion_metadata(recorded: Mapping[str, Any], ended: Mapping[str, Any], max_bytes: int) -> dict[str, Any]:
    """What an ended span adds to the metadata its activity was recorded with (at the
    span's start): the keys of the ended plan's ``ended`` metadata that are new or
    changed (token usage, the response model, finish reasons, the end time...). Within
    ``max_bytes`` for the merged result: the keys are given up as ``fit_metadata`` gives
    them up (newest in KEPT_ATTRIBUTES order first, then the span's name and times);
    empty when nothing new fits."""
    added = {key: value for key, value in ended.items() if key not in recorded or recorded[key] != value}
    if not added:
        return added
    merged = {**recorded, **added}
    try:
        if 3 * len(orjson.dumps(merged)) <= max_bytes:  # as fit_metadata: surely within
            return added
    except orjson.JSONEncodeError:
        pass
    optional = [key for key in reversed(added) if key not in ESSENTIAL_KEYS]
    while added and len(json.dumps(merged, separators=(",", ":"))) > max_bytes:
        if not optional:
            return {}
        key = optional.pop(0)
        del added[key]
        if key in recorded:
            merged[key] = recorded[key]
        else:
            del merged[key]
    return added
